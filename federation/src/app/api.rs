//! The controller serving the control API to its cluster's proxies: config
//! streaming, and SVID signing when it holds the CA.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use fedmesh_api::certs;
use fedmesh_api::controller_identity;
use fedmesh_api::server::{self, ApiConfig, ApiMetrics, Signer, TokensFile};
use fedmesh_trust::{
    CertificateAuthority, ClientAuth, PeerPolicy, SharedBundles, Svid, SvidSource, TrustBundle,
    TrustBundles, TrustDomain,
};
use prometheus_client::registry::Registry;

use super::{failed, AbortOnDrop, ApiServing, AppError};

/// The controller's own SVID lifetime when it holds the CA.
const SELF_TTL: Duration = Duration::from_secs(24 * 3600);

/// The control API as its config section describes it: the controller's
/// SVID (issued from `ca_dir`, or loaded), TLS, the signer when it holds the
/// CA, and the task that re-issues its own SVID in time.
pub(super) fn prepare(
    cfg: &ApiConfig,
    td: &TrustDomain,
    own_bundle: &TrustBundle,
    registry: &mut Registry,
    reviewer: Option<Arc<dyn server::TokenReviewer>>,
) -> Result<ApiServing, AppError> {
    let metrics = ApiMetrics::default();
    metrics.register(registry);
    let id = controller_identity(td);
    let (svid, ca) = match (&cfg.ca_dir, &cfg.cert, &cfg.key) {
        (Some(dir), None, None) => {
            let ca = CertificateAuthority::load(dir)
                .map_err(failed(format!("api.ca_dir {}", dir.display())))?;
            if ca.trust_domain() != td {
                return Err(AppError::Refused(format!(
                    "api.ca_dir is a CA of {}, not of this cluster's {td}",
                    ca.trust_domain()
                )));
            }
            let svid = ca
                .issue(&id, SELF_TTL)
                .map_err(failed("issuing the controller's SVID"))?;
            (svid, Some(Arc::new(ca)))
        }
        (None, Some(cert), Some(key)) => {
            let svid =
                Svid::load(cert, key).map_err(failed(format!("api.cert {}", cert.display())))?;
            (svid, None)
        }
        _ => {
            return Err(AppError::Refused(
                "api: set either ca_dir, or cert and key".into(),
            ))
        }
    };
    if svid.id() != &id {
        return Err(AppError::Refused(format!(
            "api: the controller's SVID must be {id}, not {}",
            svid.id()
        )));
    }
    let source = SvidSource::new(svid).map_err(failed("the controller's SVID"))?;
    let signer = match &ca {
        Some(ca) => {
            let tokens = match &cfg.tokens {
                Some(p) => {
                    let what = format!("api.tokens {}", p.display());
                    let text = std::fs::read_to_string(p).map_err(failed(what.clone()))?;
                    let f: TokensFile = serde_yaml_ng::from_str(&text).map_err(failed(what))?;
                    f.tokens
                }
                None => Vec::new(),
            };
            let signer = Signer::new(ca.clone(), tokens, cfg.limits.svid_ttl, metrics.clone());
            Some(match reviewer {
                Some(r) => signer.with_reviewer(r),
                None => signer,
            })
        }
        None => None,
    };
    // Certificate-less callers may connect only to present a token.
    let client_auth = if signer.is_some() {
        ClientAuth::Optional
    } else {
        ClientAuth::Required
    };
    let tls = fedmesh_trust::server_config_from(
        &source,
        SharedBundles::new(TrustBundles::new().with(own_bundle.clone())),
        PeerPolicy::trust_domain(td.clone()),
        &[b"h2"],
        client_auth,
    )
    .map_err(failed("api TLS"))?;
    let renewer = ca.map(|ca| AbortOnDrop(tokio::spawn(renew_own(ca, source, id))));
    Ok(ApiServing {
        listen: cfg.listen,
        tls,
        limits: cfg.limits.clone(),
        metrics,
        signer,
        renewer,
    })
}

/// Holding the CA, the controller re-issues its own SVID in time.
async fn renew_own(ca: Arc<CertificateAuthority>, source: SvidSource, id: fedmesh_trust::SpiffeId) {
    loop {
        let s = source.current();
        let due = certs::renew_at(SystemTime::now(), s.not_after());
        tokio::time::sleep(due.duration_since(SystemTime::now()).unwrap_or_default()).await;
        match ca.issue(&id, SELF_TTL).map(|n| source.store(n)) {
            Ok(Ok(())) => tracing::info!("controller SVID re-issued"),
            Ok(Err(e)) => tracing::error!(error = %e, "controller SVID refused"),
            Err(e) => {
                tracing::error!(error = %e, "re-issuing the controller SVID failed");
                tokio::time::sleep(Duration::from_secs(5)).await;
            }
        }
    }
}
