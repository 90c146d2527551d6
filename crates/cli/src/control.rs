//! The control API in the binary: proxies following their controller, and
//! `fedmesh cert request` (first contact by token). The controller serves
//! it from `fedmesh_federation::ControllerApp`.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use anyhow::Context;
use fedmesh_api::addr::HostPort;
use fedmesh_api::certs::{self, SignerAddress};
use fedmesh_api::client::{self, ClientSettings, ControllerLink, Subscription};
use fedmesh_api::controller_identity;
use fedmesh_catalog::{Catalog, ClusterName};
use fedmesh_transport::IdentityFiles;
use fedmesh_trust::{PeerPolicy, SharedBundles, SpiffeId, SvidSource, TrustBundle, TrustDomain};
use tokio::task::JoinHandle;

/// A proxy following its controller: the subscription, the task applying
/// its configs, and the SVID renewer. Dropping it stops all three.
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

/// Subscribes a proxy to its controller: every applied config first
/// replaces the proxy's bundles, then `apply` gets the catalog and its
/// version. With
/// `link.renew`, the SVID in `source` is renewed and written back to
/// `files`.
pub fn follow(
    link: &ControllerLink,
    node: &str,
    source: &SvidSource,
    bundles: SharedBundles,
    files: &IdentityFiles,
    apply: impl Fn(Catalog, Option<u64>) + Send + 'static,
) -> anyhow::Result<Follower> {
    let id = source.current().id().clone();
    let td: TrustDomain = id.trust_domain_name().parse()?;
    let own = bundles
        .load()
        .get(&td)
        .cloned()
        .with_context(|| format!("no bundle for this proxy's own trust domain {td}"))?;
    let tls = fedmesh_trust::client_config_from(
        source,
        bundles.clone(),
        PeerPolicy::id(controller_identity(&td)),
        &[b"h2"],
    )?;
    let address = link.address.resolve()?;
    let mut settings = ClientSettings::new(address, node);
    settings.cluster = Some(ClusterName::new(&link.cluster)?);
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
        let (cert, key) = (files.cert.clone(), files.key.clone());
        tasks.push(certs::keep_renewed(at, source.clone(), move |svid| {
            if let Err(e) = svid.save_to(&cert, &key) {
                tracing::warn!(error = %e, path = %cert.display(), "saving the renewed SVID failed");
            }
        }));
    }
    Ok(Follower {
        _subscription: sub,
        tasks,
    })
}

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
