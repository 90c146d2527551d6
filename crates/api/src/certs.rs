//! The proxy's side of SVID issuance: first contact with a bootstrap
//! token, then renewal with its current SVID at two thirds of the
//! lifetime, retried with backoff until the old one expires.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use fedmesh_trust::{csr, PeerPolicy, SharedBundles, SpiffeId, Svid, SvidSource, TrustBundle};
use tokio::task::JoinHandle;

use crate::{controller_identity, net, pb};

#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum CertError {
    #[error("making the CSR: {0}")]
    Csr(#[from] fedmesh_trust::CsrError),
    #[error("TLS: {0}")]
    Tls(#[from] fedmesh_trust::TlsError),
    #[error("controller: {0}")]
    Rpc(#[from] tonic::Status),
    #[error("connecting: {0}")]
    Connect(#[from] tonic::transport::Error),
    #[error("controller returned an unusable certificate: {0}")]
    Response(String),
}

impl CertError {
    /// The controller could not be reached or did not answer (worth a
    /// retry), as opposed to a refusal or a bad answer.
    pub fn is_unavailable(&self) -> bool {
        match self {
            Self::Connect(_) => true,
            Self::Rpc(s) => matches!(
                s.code(),
                tonic::Code::Unavailable | tonic::Code::DeadlineExceeded | tonic::Code::Unknown
            ),
            _ => false,
        }
    }
}

/// How to reach the controller that signs.
#[derive(Debug, Clone)]
pub struct SignerAddress {
    pub controller: SocketAddr,
    /// The bundle of this cluster's trust domain: the controller's SVID
    /// must chain to it (and the issued SVID too).
    pub bundle: TrustBundle,
    /// The proxy's live bundles, kept current by its controller: when set,
    /// this trust domain's bundle is read from here at every signing, so
    /// renewal keeps working across a root rotation (the controller's new
    /// SVID and the new SVIDs chain to a root the start-up bundle lacks).
    pub live: Option<SharedBundles>,
    pub timeout: Duration,
}

impl SignerAddress {
    /// This trust domain's bundle as it stands now.
    fn own_bundle(&self) -> TrustBundle {
        self.live
            .as_ref()
            .and_then(|b| b.load().get(self.bundle.trust_domain()).cloned())
            .unwrap_or_else(|| self.bundle.clone())
    }
}

fn tls_for(
    at: &SignerAddress,
    identity: Option<&SvidSource>,
) -> Result<Arc<rustls::ClientConfig>, CertError> {
    let own = at.own_bundle();
    let policy = PeerPolicy::id(controller_identity(own.trust_domain()));
    let bundles = SharedBundles::new(fedmesh_trust::TrustBundles::new().with(own));
    let alpn: &[&[u8]] = &[b"h2"];
    let cfg = match identity {
        Some(src) => fedmesh_trust::client_config_from(src, bundles, policy, alpn)?,
        None => fedmesh_trust::anonymous_client_config(bundles, policy, alpn)?,
    };
    Ok(Arc::new(cfg))
}

async fn sign(
    at: &SignerAddress,
    identity: Option<&SvidSource>,
    id: &SpiffeId,
    credential: Credential<'_>,
) -> Result<Svid, CertError> {
    let (csr_pem, key) = csr::new_request(id)?;
    let (token, k8s_token) = match credential {
        Credential::Token(t) => (t.to_owned(), String::new()),
        Credential::K8s(t) => (String::new(), t.to_owned()),
    };
    let channel = net::channel(at.controller, tls_for(at, identity)?, at.timeout)?;
    let mut client = pb::certificates_client::CertificatesClient::new(channel);
    let req = pb::SignRequest {
        csr_pem,
        token,
        k8s_token,
    };
    let resp = tokio::time::timeout(at.timeout, client.sign(req))
        .await
        .map_err(|_| tonic::Status::deadline_exceeded("no answer from the controller"))??
        .into_inner();
    let chain = fedmesh_trust::pem::decode_certs(&resp.chain_pem)
        .map_err(|e| CertError::Response(e.to_string()))?;
    // Never install something our own peers would refuse.
    let bundles = fedmesh_trust::TrustBundles::new().with(at.own_bundle());
    let got = fedmesh_trust::verify_svid(
        &bundles,
        &chain,
        SystemTime::now(),
        fedmesh_trust::Usage::Client,
    )
    .map_err(|e| CertError::Response(e.to_string()))?;
    if &got != id {
        return Err(CertError::Response(format!("asked for {id}, got {got}")));
    }
    Svid::new(chain, key).map_err(|e| CertError::Response(e.to_string()))
}

/// First contact: a fresh SVID for `id` in exchange for a bootstrap token.
pub async fn bootstrap(at: &SignerAddress, id: &SpiffeId, token: &str) -> Result<Svid, CertError> {
    sign(at, None, id, Credential::Token(token)).await
}

/// First contact from a Kubernetes pod: its service account token.
pub async fn bootstrap_k8s(
    at: &SignerAddress,
    id: &SpiffeId,
    k8s_token: &str,
) -> Result<Svid, CertError> {
    sign(at, None, id, Credential::K8s(k8s_token)).await
}

enum Credential<'a> {
    Token(&'a str),
    K8s(&'a str),
}

/// A fresh SVID for the identity `current` presents, authenticated by it.
pub async fn renew(at: &SignerAddress, current: &SvidSource) -> Result<Svid, CertError> {
    let id = current.current().id().clone();
    sign(at, Some(current), &id, Credential::Token("")).await
}

/// When to renew an SVID received at `got`: at two thirds of what was left.
pub fn renew_at(got: SystemTime, not_after: SystemTime) -> SystemTime {
    let life = not_after.duration_since(got).unwrap_or_default();
    got + life * 2 / 3
}

/// Puts a renewed SVID in use, then hands it to `on_renew` (which saves it
/// to disk): one that `source` refuses (another identity, a key that does
/// not match) is never written, so a restart does not pick it up either.
pub fn install(
    source: &SvidSource,
    svid: Svid,
    on_renew: impl Fn(&Svid),
) -> Result<(), fedmesh_trust::TlsError> {
    source.store(svid.clone())?;
    on_renew(&svid);
    Ok(())
}

/// Keeps `source` fresh until dropped: renews at two thirds of the
/// lifetime; on failure retries with backoff (never later than the old
/// SVID's expiry allows). `on_renew` sees every new SVID (to save it).
pub fn keep_renewed(
    at: SignerAddress,
    source: SvidSource,
    on_renew: impl Fn(&Svid) + Send + 'static,
) -> JoinHandle<()> {
    tokio::spawn(async move {
        let mut got = SystemTime::now();
        loop {
            let due = renew_at(got, source.current().not_after());
            let wait = due.duration_since(SystemTime::now()).unwrap_or_default();
            tokio::time::sleep(wait).await;
            let mut backoff = Duration::from_millis(200);
            loop {
                let renewed = renew(&at, &source).await.and_then(|svid| {
                    install(&source, svid, &on_renew)
                        .map_err(|e| CertError::Response(format!("renewed SVID refused: {e}")))
                });
                match renewed {
                    Ok(()) => {
                        tracing::info!(id = %source.current().id(), "SVID renewed");
                        got = SystemTime::now();
                        break;
                    }
                    Err(e) => {
                        let left = source
                            .current()
                            .not_after()
                            .duration_since(SystemTime::now())
                            .unwrap_or_default();
                        tracing::warn!(error = %e, ?left, "SVID renewal failed; retrying");
                        tokio::time::sleep(backoff.min(left / 4).max(Duration::from_millis(50)))
                            .await;
                        backoff = (backoff * 2).min(Duration::from_secs(30));
                    }
                }
            }
        }
    })
}
