//! First contact from a Kubernetes pod: a service account token, reviewed
//! by the controller, buys exactly that service account's SPIFFE ID, over
//! the real API (tonic, TLS with the client certificate optional).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::Arc;
use std::time::Duration;

use fedmesh_api::certs::{self, CertError, SignerAddress};
use fedmesh_api::controller_identity;
use fedmesh_api::server::{self, ApiLimits, ApiMetrics, ConfigApi, Signer, TokenReviewer};
use fedmesh_catalog::Catalog;
use fedmesh_trust::{
    CertificateAuthority, ClientAuth, PeerPolicy, SharedBundles, SvidSource, TrustBundles,
    TrustDomain,
};
use tokio::sync::watch;

/// Knows one token: `shop/web`'s.
struct Stub;

#[tonic::async_trait]
impl TokenReviewer for Stub {
    async fn review(&self, token: &str) -> Result<(String, String), String> {
        match token {
            "web-token" => Ok(("shop".into(), "web".into())),
            _ => Err("not authenticated".into()),
        }
    }
}

type Senders = (
    watch::Sender<Option<Arc<Catalog>>>,
    watch::Sender<Arc<TrustBundles>>,
);

/// The server, its CA, and the config senders it follows (kept alive).
async fn serve(
    reviewer: Option<Arc<dyn TokenReviewer>>,
) -> (server::ApiHandle, Arc<CertificateAuthority>, Senders) {
    let td: TrustDomain = "west.mesh".parse().unwrap();
    let ca =
        Arc::new(CertificateAuthority::new_root(td.clone(), Duration::from_secs(3600)).unwrap());
    let (catalog, _) = watch::channel(Some(Arc::new(Catalog::empty(
        "west".parse().unwrap(),
        td.clone(),
    ))));
    let (bundles, _) = watch::channel(Arc::new(TrustBundles::new().with(ca.bundle())));
    let metrics = ApiMetrics::default();
    let api = ConfigApi::new(
        server::versioned(catalog.subscribe(), bundles.subscribe()),
        ApiLimits::default(),
        metrics.clone(),
    );
    let mut signer = Signer::new(ca.clone(), Vec::new(), Duration::from_secs(60), metrics);
    if let Some(r) = reviewer {
        signer = signer.with_reviewer(r);
    }
    let id = ca
        .issue(&controller_identity(&td), Duration::from_secs(3600))
        .unwrap();
    let tls = fedmesh_trust::server_config_from(
        &SvidSource::new(id).unwrap(),
        SharedBundles::new(TrustBundles::new().with(ca.bundle())),
        PeerPolicy::trust_domain(td),
        &[b"h2"],
        ClientAuth::Optional,
    )
    .unwrap();
    let h = server::spawn("127.0.0.1:0".parse().unwrap(), tls, api, Some(signer))
        .await
        .unwrap();
    (h, ca, (catalog, bundles))
}

fn at(h: &server::ApiHandle, ca: &CertificateAuthority) -> SignerAddress {
    SignerAddress {
        controller: h.addr,
        bundle: ca.bundle(),
        live: None,
        timeout: Duration::from_secs(5),
    }
}

fn code(e: CertError) -> tonic::Code {
    match e {
        CertError::Rpc(s) => s.code(),
        other => panic!("not a refusal: {other}"),
    }
}

#[tokio::test]
async fn a_service_account_token_buys_exactly_its_own_identity() {
    let (h, ca, _senders) = serve(Some(Arc::new(Stub))).await;
    let at = at(&h, &ca);
    let web = "spiffe://west.mesh/ns/shop/sa/web".parse().unwrap();
    let svid = certs::bootstrap_k8s(&at, &web, "web-token").await.unwrap();
    assert_eq!(svid.id(), &web);
    // Another service account's ID with web's token: refused.
    let db = "spiffe://west.mesh/ns/shop/sa/db".parse().unwrap();
    let e = certs::bootstrap_k8s(&at, &db, "web-token")
        .await
        .unwrap_err();
    assert_eq!(code(e), tonic::Code::PermissionDenied);
    // A token the API server does not vouch for: refused, not retried.
    let e = certs::bootstrap_k8s(&at, &web, "stolen").await.unwrap_err();
    assert!(!e.is_unavailable());
    assert_eq!(code(e), tonic::Code::Unauthenticated);
}

#[tokio::test]
async fn without_a_reviewer_kubernetes_tokens_are_refused() {
    let (h, ca, _senders) = serve(None).await;
    let web = "spiffe://west.mesh/ns/shop/sa/web".parse().unwrap();
    let e = certs::bootstrap_k8s(&at(&h, &ca), &web, "web-token")
        .await
        .unwrap_err();
    assert_eq!(code(e), tonic::Code::Unauthenticated);
}
