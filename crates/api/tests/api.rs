//! The control API end to end on loopback: real tonic over real mutual TLS.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use fedmesh_api::certs::{self, SignerAddress};
use fedmesh_api::client::{self, ClientSettings, Subscription};
use fedmesh_api::server::{self, ApiLimits, ApiMetrics, BootstrapToken, ConfigApi, Signer};
use fedmesh_api::{controller_identity, pb, ProxyConfig};
use fedmesh_catalog::{Catalog, ClusterName, Endpoint, LocalService, Peer};
use fedmesh_trust::{
    CertificateAuthority, ClientAuth, PeerPolicy, SharedBundles, Svid, SvidSource, TrustBundles,
    TrustDomain,
};
use fedmesh_wire::ServiceName;
use tokio::sync::watch;

const WAIT: Duration = Duration::from_secs(10);

struct World {
    td: TrustDomain,
    ca: Arc<CertificateAuthority>,
    other_ca: CertificateAuthority,
    catalog: watch::Sender<Option<Arc<Catalog>>>,
    bundles: watch::Sender<Arc<TrustBundles>>,
    metrics: ApiMetrics,
    addr: SocketAddr,
    server: Option<server::ApiHandle>,
}

/// Waits (bounded) until `f` holds.
async fn eventually(what: &str, f: impl Fn() -> bool) {
    tokio::time::timeout(WAIT, async {
        while !f() {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .unwrap_or_else(|_| panic!("timed out waiting for {what}"));
}

fn svc(name: &str, port: u16, td: &TrustDomain) -> LocalService {
    LocalService {
        vips: Vec::new(),
        name: name.parse().unwrap(),
        ports: vec![port],
        exported: true,
        audience: None,
        endpoints: vec![Endpoint {
            address: "127.0.0.1:9000".parse().unwrap(),
            identity: td.workload("default", name).unwrap(),
        }],
    }
}

fn catalog(td: &TrustDomain, services: &[&str], peer: Option<&TrustDomain>) -> Catalog {
    let mut imports = BTreeMap::new();
    let mut peers = Vec::new();
    if let Some(ptd) = peer {
        peers.push(Peer {
            cluster: ClusterName::new("east").unwrap(),
            trust_domain: ptd.clone(),
            address: "127.0.0.1:7000".parse().unwrap(),
            tcp_address: Some("127.0.0.1:7001".parse().unwrap()),
            identity: fedmesh_catalog::gateway_identity(ptd),
            region: String::new(),
        });
        imports.insert(
            "cart.shop.svc.clusterset.local"
                .parse::<ServiceName>()
                .unwrap(),
            vec![ClusterName::new("east").unwrap()],
        );
    }
    Catalog::assemble(
        ClusterName::new("west").unwrap(),
        td.clone(),
        None,
        services.iter().map(|s| svc(s, 8080, td)).collect(),
        imports,
        peers,
    )
    .unwrap()
}

fn name(s: &str) -> String {
    format!("{s}.default.svc.clusterset.local")
}

async fn start_on(addr: SocketAddr, world: Option<World>) -> World {
    start_with(addr, world, ApiLimits::default()).await
}

async fn start_with(addr: SocketAddr, world: Option<World>, limits: ApiLimits) -> World {
    let (td, ca, other_ca, catalog, bundles) = match world {
        Some(mut w) => {
            if let Some(s) = w.server.take() {
                s.shutdown().await;
            }
            (w.td, w.ca, w.other_ca, w.catalog, w.bundles)
        }
        None => {
            let td: TrustDomain = "west.mesh".parse().unwrap();
            let ca = Arc::new(
                CertificateAuthority::new_root(td.clone(), Duration::from_secs(3600)).unwrap(),
            );
            let other_ca = CertificateAuthority::new_root(
                "east.mesh".parse().unwrap(),
                Duration::from_secs(3600),
            )
            .unwrap();
            let (catalog, _) = watch::channel(Some(Arc::new(catalog(&td, &[&name("web")], None))));
            let (bundles, _) = watch::channel(Arc::new(TrustBundles::new().with(ca.bundle())));
            (td, ca, other_ca, catalog, bundles)
        }
    };
    let metrics = ApiMetrics::default();
    let source = server::versioned(catalog.subscribe(), bundles.subscribe());
    let api = ConfigApi::new(source, limits, metrics.clone());
    let signer = Signer::new(
        ca.clone(),
        vec![BootstrapToken {
            token: "s3cret".into(),
            identities: vec!["spiffe://west.mesh/ns/shop/*".into()],
        }],
        Duration::from_secs(3),
        metrics.clone(),
    );
    let id = ca
        .issue(&controller_identity(&td), Duration::from_secs(3600))
        .unwrap();
    let tls = fedmesh_trust::server_config_from(
        &SvidSource::new(id).unwrap(),
        SharedBundles::new(TrustBundles::new().with(ca.bundle())),
        PeerPolicy::trust_domain(td.clone()),
        &[b"h2"],
        ClientAuth::Optional,
    )
    .unwrap();
    let server = server::spawn(addr, tls, api, Some(signer)).await.unwrap();
    let addr = server.addr;
    World {
        td,
        ca,
        other_ca,
        catalog,
        bundles,
        metrics,
        addr,
        server: Some(server),
    }
}

async fn start() -> World {
    start_on("127.0.0.1:0".parse().unwrap(), None).await
}

fn proxy_tls(w: &World, svid: &Svid) -> Arc<rustls::ClientConfig> {
    Arc::new(
        fedmesh_trust::client_config(
            svid,
            SharedBundles::new(TrustBundles::new().with(w.ca.bundle())),
            PeerPolicy::id(controller_identity(&w.td)),
            &[b"h2"],
        )
        .unwrap(),
    )
}

fn subscribe(w: &World) -> Subscription {
    let svid =
        w.ca.issue(&w.td.system_id("gateway"), Duration::from_secs(3600))
            .unwrap();
    let mut s = ClientSettings::new(w.addr, "gateway");
    s.cluster = Some(ClusterName::new("west").unwrap());
    s.backoff_max = Duration::from_millis(300);
    client::subscribe(s, proxy_tls(w, &svid))
}

async fn until(sub: &Subscription, f: impl Fn(&ProxyConfig) -> bool) -> ProxyConfig {
    let mut rx = sub.config();
    let got = tokio::time::timeout(WAIT, rx.wait_for(|c| c.as_ref().is_some_and(&f)))
        .await
        .expect("config did not arrive in time")
        .unwrap();
    got.clone().unwrap()
}

fn has(c: &ProxyConfig, s: &str) -> bool {
    c.catalog.service(&s.parse().unwrap()).is_some()
}

#[tokio::test]
async fn snapshot_then_deltas_reach_the_proxy() {
    let w = start().await;
    let sub = subscribe(&w);
    let first = until(&sub, |c| has(c, &name("web"))).await;
    assert_eq!(first.bundles.len(), 1);

    // A peer with its bundle, and an import from it: one delta.
    let east = w.other_ca.bundle();
    w.bundles.send_replace(Arc::new(
        TrustBundles::new().with(w.ca.bundle()).with(east.clone()),
    ));
    w.catalog.send_replace(Some(Arc::new(catalog(
        &w.td,
        &[&name("web"), &name("api")],
        Some(east.trust_domain()),
    ))));
    let second = until(&sub, |c| {
        has(c, &name("api")) && c.catalog.import_count() == 1
    })
    .await;
    assert_eq!(second.bundles.len(), 2);
    assert_eq!(
        second
            .catalog
            .imports(&"cart.shop.svc.clusterset.local".parse().unwrap())
            .len(),
        1
    );

    // Removal travels as a delta too.
    w.catalog.send_replace(Some(Arc::new(catalog(
        &w.td,
        &[&name("api")],
        Some(east.trust_domain()),
    ))));
    until(&sub, |c| !has(c, &name("web")) && has(c, &name("api"))).await;
    let st = sub.status();
    assert_eq!(st.rejected, 0, "{st:?}");
    assert!(st.applied >= 3, "{st:?}");
    eventually("three ACKs", || w.metrics.ack_count() >= 3).await;
    assert_eq!(w.metrics.nack_count(), 0);
}

#[tokio::test]
async fn an_invalid_update_is_nacked_and_the_last_good_config_stays() {
    let w = start().await;
    let sub = subscribe(&w);
    until(&sub, |c| has(c, &name("web"))).await;

    // A peer whose trust domain has no bundle: unverifiable, so refused.
    let east = w.other_ca.bundle();
    w.catalog.send_replace(Some(Arc::new(catalog(
        &w.td,
        &[&name("web"), &name("api")],
        Some(east.trust_domain()),
    ))));
    eventually("a NACK", || w.metrics.nack_count() > 0).await;
    let kept = sub.config().borrow().clone().unwrap();
    assert!(
        has(&kept, &name("web")) && !has(&kept, &name("api")),
        "last good config replaced"
    );
    assert!(sub.status().last_error.unwrap().contains("no trust bundle"));

    // Fixing the config (the bundle arrives) heals the proxy.
    w.bundles
        .send_replace(Arc::new(TrustBundles::new().with(w.ca.bundle()).with(east)));
    until(&sub, |c| has(c, &name("api"))).await;
}

#[tokio::test]
async fn proxies_keep_their_config_while_the_controller_is_down_and_resync_after() {
    let w = start().await;
    let sub = subscribe(&w);
    until(&sub, |c| has(c, &name("web"))).await;
    let addr = w.addr;
    let mut w = w;
    w.server.take().unwrap().shutdown().await;
    eventually("the proxy to notice", || !sub.status().connected).await;
    assert!(has(sub.config().borrow().as_ref().unwrap(), &name("web")));
    // Changes made while the proxy is cut off arrive after the restart.
    w.catalog
        .send_replace(Some(Arc::new(catalog(&w.td, &[&name("new")], None))));
    let w = start_on(addr, Some(w)).await;
    until(&sub, |c| has(c, &name("new")) && !has(c, &name("web"))).await;
    assert!(sub.status().connects >= 2);
    drop(w);
}

#[tokio::test]
async fn subscribing_needs_an_svid_of_this_trust_domain() {
    let w = start().await;
    // No certificate: TLS lets it in (bootstrap), Subscribe does not.
    let anon = fedmesh_trust::anonymous_client_config(
        SharedBundles::new(TrustBundles::new().with(w.ca.bundle())),
        PeerPolicy::id(controller_identity(&w.td)),
        &[b"h2"],
    )
    .unwrap();
    let sub = client::subscribe(ClientSettings::new(w.addr, "nobody"), Arc::new(anon));
    eventually("the anonymous subscriber refused", || {
        w.metrics.rejected_count("no_svid") > 0
    })
    .await;
    assert!(sub.config().borrow().is_none());
    assert!(sub.status().last_error.unwrap().contains("SVID"));

    // Another trust domain's SVID fails the handshake.
    let foreign = w
        .other_ca
        .issue(
            &"east.mesh"
                .parse::<TrustDomain>()
                .unwrap()
                .system_id("gateway"),
            Duration::from_secs(60),
        )
        .unwrap();
    let tls = fedmesh_trust::client_config(
        &foreign,
        SharedBundles::new(TrustBundles::new().with(w.ca.bundle())),
        PeerPolicy::id(controller_identity(&w.td)),
        &[b"h2"],
    )
    .unwrap();
    let sub = client::subscribe(ClientSettings::new(w.addr, "intruder"), Arc::new(tls));
    eventually("the foreign SVID refused", || {
        w.metrics.rejected_count("handshake_failed") > 0
    })
    .await;
    assert!(sub.config().borrow().is_none());
}

#[tokio::test]
async fn a_client_speaking_out_of_turn_is_cut_off() {
    let w = start().await;
    let svid =
        w.ca.issue(&w.td.system_id("gateway"), Duration::from_secs(3600))
            .unwrap();
    let channel = fedmesh_api::net::channel(
        w.addr,
        {
            let mut c = (*proxy_tls(&w, &svid)).clone();
            c.alpn_protocols = vec![b"h2".to_vec()];
            Arc::new(c)
        },
        WAIT,
    )
    .unwrap();
    let mut client = pb::config_client::ConfigClient::new(channel);
    // An Ack before any Hello.
    let out = tokio_stream::iter(vec![pb::SubscribeRequest {
        kind: Some(pb::subscribe_request::Kind::Ack(pb::Ack { version: 7 })),
    }]);
    let mut updates = client.subscribe(out).await.unwrap().into_inner();
    let err = updates.message().await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::InvalidArgument, "{err}");
    assert_eq!(w.metrics.rejected_count("no_hello"), 1);
}

fn signer_at(w: &World) -> SignerAddress {
    SignerAddress {
        controller: w.addr,
        bundle: w.ca.bundle(),
        live: None,
        timeout: WAIT,
    }
}

#[tokio::test]
async fn bootstrap_token_gets_an_svid_only_for_what_it_allows() {
    let w = start().await;
    let at = signer_at(&w);
    let id = w.td.workload("shop", "cart").unwrap();
    let svid = certs::bootstrap(&at, &id, "s3cret").await.unwrap();
    assert_eq!(svid.id(), &id);

    let outside = w.td.workload("bank", "vault").unwrap();
    let e = certs::bootstrap(&at, &outside, "s3cret").await.unwrap_err();
    assert!(
        matches!(&e, certs::CertError::Rpc(s) if s.code() == tonic::Code::PermissionDenied),
        "{e}"
    );
    let e = certs::bootstrap(&at, &id, "wrong").await.unwrap_err();
    assert!(
        matches!(&e, certs::CertError::Rpc(s) if s.code() == tonic::Code::Unauthenticated),
        "{e}"
    );
    let e = certs::bootstrap(&at, &id, "").await.unwrap_err();
    assert!(
        matches!(&e, certs::CertError::Rpc(s) if s.code() == tonic::Code::Unauthenticated),
        "{e}"
    );
    // Another trust domain's ID, even with a token.
    let foreign = "spiffe://east.mesh/ns/shop/sa/cart".parse().unwrap();
    let e = certs::bootstrap(&at, &foreign, "s3cret").await.unwrap_err();
    assert!(matches!(&e, certs::CertError::Rpc(_)), "{e}");
    assert_eq!(w.metrics.rejected_count("token_scope"), 2);
    assert_eq!(w.metrics.rejected_count("unknown_token"), 1);
    assert_eq!(w.metrics.rejected_count("no_credentials"), 1);
    assert_eq!(w.metrics.signed_count(), 1);
}

#[tokio::test]
async fn an_svid_renews_itself_and_nothing_else() {
    let w = start().await;
    let at = signer_at(&w);
    let id = w.td.workload("shop", "cart").unwrap();
    let first = certs::bootstrap(&at, &id, "s3cret").await.unwrap();
    let source = SvidSource::new(first.clone()).unwrap();

    // The signer issues 3 s SVIDs: renewal is due after 2 s.
    let _renewer = certs::keep_renewed(at.clone(), source.clone(), |_| {});
    eventually("a renewal", || {
        source.current().not_after() != first.not_after()
    })
    .await;
    assert_eq!(source.current().id(), &id);
    assert!(w.metrics.signed_count() >= 2);

    // A raw CSR for another identity, authenticated by this SVID.
    let other = w.td.workload("shop", "admin").unwrap();
    let (csr, _) = fedmesh_trust::csr::new_request(&other).unwrap();
    let ch = fedmesh_api::net::channel(
        w.addr,
        {
            let mut c = fedmesh_trust::client_config_from(
                &source,
                SharedBundles::new(TrustBundles::new().with(w.ca.bundle())),
                PeerPolicy::id(controller_identity(&w.td)),
                &[b"h2"],
            )
            .unwrap();
            c.alpn_protocols = vec![b"h2".to_vec()];
            Arc::new(c)
        },
        WAIT,
    )
    .unwrap();
    let mut c = pb::certificates_client::CertificatesClient::new(ch);
    let e = c
        .sign(pb::SignRequest {
            csr_pem: csr,
            token: "s3cret".into(),
            k8s_token: String::new(),
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::PermissionDenied, "{e}");
    // Garbage instead of a CSR.
    let e = c
        .sign(pb::SignRequest {
            csr_pem:
                "-----BEGIN CERTIFICATE REQUEST-----\nAAAA\n-----END CERTIFICATE REQUEST-----\n"
                    .into(),
            token: String::new(),
            k8s_token: String::new(),
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::InvalidArgument, "{e}");
    assert_eq!(w.metrics.rejected_count("not_own_identity"), 1);
    assert_eq!(w.metrics.rejected_count("bad_csr"), 1);
}

#[tokio::test]
async fn a_burst_of_changes_reaches_a_proxy_as_one_update() {
    let limits = ApiLimits {
        min_push_interval: Duration::from_secs(2),
        ..ApiLimits::default()
    };
    let w = start_with("127.0.0.1:0".parse().unwrap(), None, limits).await;
    let sub = subscribe(&w);
    until(&sub, |c| has(c, &name("web"))).await;
    let applied = sub.status().applied;
    // Three versions inside one push interval: only the last is sent.
    for extra in ["a", "b", "c"] {
        w.catalog.send_replace(Some(Arc::new(catalog(
            &w.td,
            &[&name("web"), &name(extra)],
            None,
        ))));
    }
    until(&sub, |c| has(c, &name("c"))).await;
    assert_eq!(
        sub.status().applied,
        applied + 1,
        "the burst was not coalesced"
    );
}

#[test]
fn a_renewal_the_source_refuses_is_never_written_to_disk() {
    let td: TrustDomain = "east.acme".parse().unwrap();
    let ca = CertificateAuthority::new_root(td.clone(), Duration::from_secs(3600)).unwrap();
    let id = td.workload("shop", "cart").unwrap();
    let first = ca.issue(&id, Duration::from_secs(600)).unwrap();
    let dir = std::env::temp_dir().join(format!("fedmesh-renewal-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let (cert, key) = (dir.join("svid.pem"), dir.join("svid.key"));
    first.save_to(&cert, &key).unwrap();
    let before = (std::fs::read(&cert).unwrap(), std::fs::read(&key).unwrap());
    let source = SvidSource::new(first.clone()).unwrap();
    let save = |s: &Svid| s.save_to(&cert, &key).unwrap();

    // Another identity: the source refuses it, and nothing is written.
    let other = ca
        .issue(
            &td.workload("shop", "admin").unwrap(),
            Duration::from_secs(600),
        )
        .unwrap();
    assert!(certs::install(&source, other, save).is_err());
    let after = (std::fs::read(&cert).unwrap(), std::fs::read(&key).unwrap());
    assert!(before == after, "a refused SVID reached the disk");
    assert_eq!(source.current().not_after(), first.not_after());

    // A good renewal is used, then written.
    let renewed = ca.issue(&id, Duration::from_secs(900)).unwrap();
    certs::install(&source, renewed.clone(), save).unwrap();
    assert_eq!(source.current().not_after(), renewed.not_after());
    assert_ne!(std::fs::read(&cert).unwrap(), before.0);
    std::fs::remove_dir_all(&dir).unwrap();
}
