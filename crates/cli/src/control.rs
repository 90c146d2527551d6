//! `fedmesh cert request`: a proxy's first contact with its controller, by
//! token. The controller serves the API from
//! `fedmesh_federation::ControllerApp`; proxies follow it with
//! `fedmesh_api::follow::Follower`.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, SystemTime};

use anyhow::Context;
use fedmesh_api::addr::HostPort;
use fedmesh_api::certs::{self, SignerAddress};
use fedmesh_trust::{SpiffeId, TrustBundle, TrustDomain};

/// What `fedmesh cert request` presents.
pub enum Token {
    /// A file holding a bootstrap token.
    Bootstrap(PathBuf),
    /// A file holding a Kubernetes service account token.
    Kubernetes(PathBuf),
}

/// `fedmesh cert request`: first contact with a bootstrap token or a
/// Kubernetes service account token. Retries (bounded: 2 minutes) while
/// the controller is unreachable, as a pod starting beside it would.
pub async fn request(
    controller: &HostPort,
    bundle: &Path,
    id: SpiffeId,
    token: &Token,
    out: PathBuf,
) -> anyhow::Result<ExitCode> {
    let td: TrustDomain = id.trust_domain_name().parse()?;
    let text = std::fs::read_to_string(bundle).with_context(|| bundle.display().to_string())?;
    let bundle = TrustBundle::from_pem(td, &text)?;
    let (Token::Bootstrap(file) | Token::Kubernetes(file)) = token;
    let text = std::fs::read_to_string(file).with_context(|| file.display().to_string())?;
    let secret = text.trim();
    let at = SignerAddress {
        controller: controller.resolve()?,
        bundle: bundle.clone(),
        live: None,
        timeout: Duration::from_secs(10),
    };
    let deadline = std::time::Instant::now() + Duration::from_secs(120);
    let mut backoff = Duration::from_millis(500);
    let svid = loop {
        let got = match token {
            Token::Bootstrap(_) => certs::bootstrap(&at, &id, secret).await,
            Token::Kubernetes(_) => certs::bootstrap_k8s(&at, &id, secret).await,
        };
        match got {
            Ok(svid) => break svid,
            // A refusal will not change by retrying; an unreachable
            // controller (still starting) may.
            Err(e) if e.is_unavailable() && std::time::Instant::now() < deadline => {
                tracing::warn!(error = %e, retry_in = ?backoff, "controller unreachable");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(8));
            }
            Err(e) => return Err(e.into()),
        }
    };
    svid.save(&out)?;
    std::fs::write(out.join("bundle.pem"), bundle.to_pem())?;
    let left = svid
        .not_after()
        .duration_since(SystemTime::now())
        .unwrap_or_default();
    crate::emit(&format!(
        "issued {} (valid {}) into {}\n",
        svid.id(),
        humantime::format_duration(Duration::from_secs(left.as_secs())),
        out.display()
    ));
    Ok(ExitCode::SUCCESS)
}
