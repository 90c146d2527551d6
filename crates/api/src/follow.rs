//! A proxy following its controller: the subscription, the task applying
//! each accepted config, and the SVID renewer, as one value the gateway and
//! the sidecar keep for as long as they run.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use fedmesh_catalog::{Catalog, ClusterName};
use fedmesh_trust::{PeerPolicy, SharedBundles, SvidSource, TrustDomain};
use tokio::task::JoinHandle;

use crate::certs::{self, SignerAddress};
use crate::client::{self, ClientSettings, ControllerLink, Subscription};
use crate::controller_identity;

/// Why a proxy could not start following its controller.
#[derive(Debug, thiserror::Error)]
pub enum FollowError {
    #[error("the proxy's own trust domain: {0}")]
    TrustDomain(String),
    #[error("no bundle for this proxy's own trust domain {0}")]
    NoOwnBundle(TrustDomain),
    #[error("TLS to the controller: {0}")]
    Tls(String),
    #[error("controller address: {0}")]
    Address(#[from] crate::addr::AddressError),
    #[error("controller.cluster: {0}")]
    Cluster(String),
}

/// Where a renewed SVID is written, so a restarted proxy starts with it.
#[derive(Debug, Clone)]
pub struct SaveTo {
    pub cert: PathBuf,
    pub key: PathBuf,
}

/// A proxy following its controller. Dropping it stops the subscription,
/// the applying task and the renewer.
pub struct Follower {
    _subscription: Subscription,
    tasks: Vec<JoinHandle<()>>,
}

impl Drop for Follower {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

impl Follower {
    /// Subscribes a proxy to its controller: every applied config first
    /// replaces the proxy's bundles, then `apply` gets the catalog and its
    /// version. With `link.renew`, the SVID in `source` is renewed (and
    /// written to `save_to`, when given).
    pub fn start(
        link: &ControllerLink,
        node: &str,
        source: &SvidSource,
        bundles: SharedBundles,
        save_to: Option<SaveTo>,
        apply: impl Fn(Catalog, Option<u64>) + Send + 'static,
    ) -> Result<Self, FollowError> {
        let id = source.current().id().clone();
        let td: TrustDomain = id
            .trust_domain_name()
            .parse()
            .map_err(|e: fedmesh_trust::IdError| FollowError::TrustDomain(e.to_string()))?;
        let own = bundles
            .load()
            .get(&td)
            .cloned()
            .ok_or_else(|| FollowError::NoOwnBundle(td.clone()))?;
        let tls = fedmesh_trust::client_config_from(
            source,
            bundles.clone(),
            PeerPolicy::id(controller_identity(&td)),
            &[b"h2"],
        )
        .map_err(|e| FollowError::Tls(e.to_string()))?;
        let address = link.address.resolve()?;
        let mut settings = ClientSettings::new(address, node);
        settings.cluster =
            Some(ClusterName::new(&link.cluster).map_err(|e| FollowError::Cluster(e.to_string()))?);
        let sub = client::subscribe(settings, Arc::new(tls));
        let version = sub.version_reader();
        let bundles_live = bundles.clone();
        let mut tasks = vec![tokio::spawn(client::follow(sub.config(), move |c| {
            // Bundles first: the catalog may name peers only they trust.
            bundles.store((*c.bundles).clone());
            apply((*c.catalog).clone(), version());
        }))];
        if link.renew {
            let at = SignerAddress {
                controller: address,
                bundle: own,
                live: Some(bundles_live),
                timeout: Duration::from_secs(10),
            };
            tasks.push(certs::keep_renewed(at, source.clone(), move |svid| {
                let Some(to) = &save_to else { return };
                if let Err(e) = svid.save_to(&to.cert, &to.key) {
                    tracing::warn!(error = %e, path = %to.cert.display(), "saving the renewed SVID failed");
                }
            }));
        }
        Ok(Self {
            _subscription: sub,
            tasks,
        })
    }
}
