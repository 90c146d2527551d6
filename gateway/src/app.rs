//! A gateway process's parts as one value: the gateway its settings build
//! and, with a `controller` section, the follower that applies the
//! controller's configs and renews the gateway's SVID. `fedmesh gateway`
//! is this plus signals and the drain.

use std::sync::Arc;

use fedmesh_api::follow::{FollowError, Follower, SaveTo};
use fedmesh_transport::IdentityFiles;
use prometheus_client::registry::Registry;

use crate::{Gateway, GatewayError, GatewaySettings};

/// Why a gateway could not start.
#[derive(Debug, thiserror::Error)]
pub enum GatewayAppError {
    #[error(transparent)]
    Build(#[from] GatewayError),
    #[error("following the controller: {0}")]
    Follow(#[from] FollowError),
}

/// A running gateway and its follower; dropping it stops both.
pub struct GatewayApp {
    gateway: Arc<Gateway>,
    follower: Option<Follower>,
}

impl GatewayApp {
    /// Builds the gateway and, when `settings` name a controller, follows
    /// it; a renewed SVID is written to `identity`.
    pub async fn build(
        settings: GatewaySettings,
        identity: &IdentityFiles,
        registry: &mut Registry,
    ) -> Result<Self, GatewayAppError> {
        let link = settings.controller.clone();
        let bundles = settings.bundles.clone();
        let gateway = Arc::new(Gateway::build(settings, registry).await?);
        let follower = match &link {
            Some(link) => {
                let g = gateway.clone();
                Some(Follower::start(
                    link,
                    "gateway",
                    gateway.identity_source(),
                    bundles,
                    Some(SaveTo {
                        cert: identity.cert.clone(),
                        key: identity.key.clone(),
                    }),
                    move |c, v| g.set_config(c, v),
                )?)
            }
            None => None,
        };
        Ok(Self { gateway, follower })
    }

    pub fn gateway(&self) -> &Gateway {
        &self.gateway
    }

    /// Stops following the controller, then the gateway: every listener,
    /// peer connection and tunneled connection.
    pub async fn shutdown(self) {
        drop(self.follower);
        match Arc::try_unwrap(self.gateway) {
            Ok(gw) => gw.shutdown().await,
            // The follower's applying task still holds it for a moment.
            Err(gw) => gw.close(),
        }
    }
}
