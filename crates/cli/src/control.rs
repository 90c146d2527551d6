//! The control API in the binary: the controller serving it, proxies
//! following it, and `fedmesh cert request` (first contact by token).

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use anyhow::Context;
use fedmesh_api::addr::HostPort;
use fedmesh_api::certs::{self, SignerAddress};
use fedmesh_api::client::{self, ClientSettings, ControllerLink, Subscription};
use fedmesh_api::controller_identity;
use fedmesh_api::server::{self, ApiConfig, ApiHandle, ApiMetrics, ConfigApi, Signer, TokensFile};
use fedmesh_catalog::{Catalog, ClusterName};
use fedmesh_transport::IdentityFiles;
use fedmesh_trust::{
    CertificateAuthority, ClientAuth, PeerPolicy, SharedBundles, SpiffeId, Svid, SvidSource,
    TrustBundle, TrustBundles, TrustDomain,
};
use prometheus_client::registry::Registry;
use tokio::task::JoinHandle;

/// Starts the controller's API from its config section.
pub async fn serve(
    cfg: &ApiConfig,
    td: &TrustDomain,
    own_bundle: &TrustBundle,
    ctrl: &fedmesh_federation::Controller,
    registry: &mut Registry,
    reviewer: Option<Arc<dyn server::TokenReviewer>>,
) -> anyhow::Result<(ApiHandle, Option<JoinHandle<()>>)> {
    let metrics = ApiMetrics::default();
    metrics.register(registry);
    let id = controller_identity(td);
    let (svid, ca) = match (&cfg.ca_dir, &cfg.cert, &cfg.key) {
        (Some(dir), None, None) => {
            let ca = CertificateAuthority::load(dir)
                .with_context(|| format!("api.ca_dir {}", dir.display()))?;
            anyhow::ensure!(
                ca.trust_domain() == td,
                "api.ca_dir is a CA of {}, not of this cluster's {td}",
                ca.trust_domain()
            );
            (ca.issue(&id, SELF_TTL)?, Some(Arc::new(ca)))
        }
        (None, Some(cert), Some(key)) => (Svid::load(cert, key)?, None),
        _ => anyhow::bail!("api: set either ca_dir, or cert and key"),
    };
    anyhow::ensure!(
        svid.id() == &id,
        "api: the controller's SVID must be {id}, not {}",
        svid.id()
    );
    let source = SvidSource::new(svid)?;
    let signer = match &ca {
        Some(ca) => {
            let tokens = match &cfg.tokens {
                Some(p) => {
                    let text = std::fs::read_to_string(p)
                        .with_context(|| format!("api.tokens {}", p.display()))?;
                    let f: TokensFile = serde_yaml_ng::from_str(&text)
                        .with_context(|| format!("api.tokens {}", p.display()))?;
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
    )?;
    let api = ConfigApi::new(
        server::versioned(ctrl.catalog(), ctrl.bundles()),
        cfg.limits.clone(),
        metrics,
    );
    let handle = server::spawn(cfg.listen, tls, api, signer).await?;
    // Holding the CA, the controller re-issues its own SVID in time.
    let renewer = ca.map(|ca| {
        tokio::spawn(async move {
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
        })
    });
    Ok((handle, renewer))
}

/// The controller's own SVID lifetime when it holds the CA.
const SELF_TTL: Duration = Duration::from_secs(24 * 3600);

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
