//! A sidecar process's parts as one value: the sidecar its settings build
//! and, with a `controller` section, the follower that applies the
//! controller's configs and renews the sidecar's SVID. `fedmesh sidecar`
//! is this plus signals.

use std::sync::Arc;

use fedmesh_api::follow::{FollowError, Follower, SaveTo};
use fedmesh_transport::IdentityFiles;
use prometheus_client::registry::Registry;

use crate::{Sidecar, SidecarError, SidecarSettings};

/// Why a sidecar could not start.
#[derive(Debug, thiserror::Error)]
pub enum SidecarAppError {
    #[error(transparent)]
    Build(#[from] SidecarError),
    #[error("following the controller: {0}")]
    Follow(#[from] FollowError),
}

/// A running sidecar and its follower; dropping it stops both.
pub struct SidecarApp {
    sidecar: Arc<Sidecar>,
    follower: Option<Follower>,
}

impl SidecarApp {
    /// Builds the sidecar and, when `settings` name a controller, follows
    /// it; a renewed SVID is written to `identity`.
    pub async fn build(
        settings: SidecarSettings,
        identity: &IdentityFiles,
        registry: &mut Registry,
    ) -> Result<Self, SidecarAppError> {
        let link = settings.controller.clone();
        let bundles = settings.bundles.clone();
        let sidecar = Arc::new(Sidecar::build(settings, registry).await?);
        let follower = match &link {
            Some(link) => {
                let s = sidecar.clone();
                Some(Follower::start(
                    link,
                    &format!("sidecar/{}", sidecar.identity()),
                    sidecar.identity_source(),
                    bundles,
                    Some(SaveTo {
                        cert: identity.cert.clone(),
                        key: identity.key.clone(),
                    }),
                    move |c, v| s.set_config(c, v),
                )?)
            }
            None => None,
        };
        Ok(Self { sidecar, follower })
    }

    pub fn sidecar(&self) -> &Sidecar {
        &self.sidecar
    }

    /// Stops following the controller, then the sidecar's listeners.
    pub fn shutdown(self) {
        drop(self.follower);
        if let Ok(sc) = Arc::try_unwrap(self.sidecar) {
            sc.shutdown();
        }
    }
}
