//! The Kubernetes source against an API server stand-in that speaks
//! list/watch (resourceVersions, bookmarks, 410 Gone) over real HTTP.
#![cfg(feature = "kube")]
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use fedmesh_catalog::mcs::{self, Port, Protocol, ServiceType};
use fedmesh_catalog::ClusterName;
use fedmesh_federation::k8s::{self, KubeSettings, KubeSource};
use fedmesh_federation::{LocalService, McsView};
use fedmesh_testkit::fake_kube::FakeKube;
use fedmesh_wire::ServiceName;
use prometheus_client::registry::Registry;
use serde_json::json;
use tokio::sync::watch;

const SERVICES: &str = "/api/v1/services";
const SLICES: &str = "/apis/discovery.k8s.io/v1/endpointslices";
const EXPORTS: &str = "/apis/multicluster.x-k8s.io/v1beta1/serviceexports";
const WAIT: Duration = Duration::from_secs(10);

fn service(ns: &str, name: &str, ports: serde_json::Value, sa: Option<&str>) -> serde_json::Value {
    let mut annotations = serde_json::Map::new();
    if let Some(sa) = sa {
        annotations.insert("fedmesh.io/service-account".into(), json!(sa));
    }
    json!({
        "apiVersion": "v1", "kind": "Service",
        "metadata": { "name": name, "namespace": ns, "annotations": annotations },
        "spec": { "type": "ClusterIP", "clusterIP": "10.0.0.1", "ports": ports },
    })
}

fn slice(ns: &str, name: &str, svc: &str, endpoints: &[(&str, bool)]) -> serde_json::Value {
    json!({
        "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
        "metadata": { "name": name, "namespace": ns, "labels": { "kubernetes.io/service-name": svc } },
        "addressType": "IPv4",
        "endpoints": endpoints.iter().map(|(ip, ready)| json!({
            "addresses": [ip], "conditions": { "ready": ready },
        })).collect::<Vec<_>>(),
    })
}

fn export(ns: &str, name: &str, audience: Option<&str>) -> serde_json::Value {
    let mut annotations = serde_json::Map::new();
    if let Some(a) = audience {
        annotations.insert("fedmesh.io/audience".into(), json!(a));
    }
    json!({
        "apiVersion": "multicluster.x-k8s.io/v1beta1", "kind": "ServiceExport",
        "metadata": { "name": name, "namespace": ns, "annotations": annotations,
                      "creationTimestamp": "2026-01-02T03:04:05Z" },
    })
}

fn settings() -> KubeSettings {
    KubeSettings {
        cluster: ClusterName::new("west").unwrap(),
        trust_domain: "west.mesh".parse().unwrap(),
        inbound_port: 15006,
        exclude_namespaces: ["kube-system".to_owned()].into(),
    }
}

async fn client(fake: &FakeKube) -> kube::Client {
    kube::Client::try_from(kube::Config::new(fake.url().parse().unwrap())).unwrap()
}

/// A cluster with: shop/cart (exported to east, two ports, one ready and
/// one unready endpoint, own service account), shop/internal (not
/// exported), an ExternalName service, and a service with an unusable port.
fn seed(fake: &FakeKube) {
    fake.put(
        SERVICES,
        service(
            "shop",
            "cart",
            json!([{ "port": 80, "protocol": "TCP" }, { "port": 5353, "protocol": "UDP" }]),
            Some("cart"),
        ),
    );
    fake.put(
        SERVICES,
        service("shop", "internal", json!([{ "port": 8080 }]), None),
    );
    fake.put(
        SERVICES,
        json!({ "apiVersion": "v1", "kind": "Service", "metadata": { "name": "ext", "namespace": "shop" },
                "spec": { "type": "ExternalName", "externalName": "example.com" } }),
    );
    fake.put(
        SERVICES,
        service(
            "shop",
            "odd",
            json!([{ "port": 70000, "protocol": "TCP" }, { "port": 81, "protocol": "HTTP" }]),
            None,
        ),
    );
    fake.put(
        SLICES,
        slice(
            "shop",
            "cart-abc",
            "cart",
            &[("10.1.0.5", true), ("10.1.0.6", false)],
        ),
    );
    fake.put(
        SLICES,
        slice("shop", "internal-x", "internal", &[("10.1.0.9", true)]),
    );
    fake.put(EXPORTS, export("shop", "cart", Some("east, north")));
}

async fn next_local(
    rx: &mut watch::Receiver<Option<Vec<LocalService>>>,
    what: &str,
    f: impl Fn(&[LocalService]) -> bool,
) -> Vec<LocalService> {
    let got = tokio::time::timeout(WAIT, rx.wait_for(|l| l.as_deref().is_some_and(&f)))
        .await
        .unwrap_or_else(|_| panic!("timed out waiting for {what}"))
        .unwrap();
    got.clone().unwrap()
}

fn find<'a>(l: &'a [LocalService], name: &str) -> Option<&'a LocalService> {
    l.iter().find(|s| s.name.to_string() == name)
}

const CART: &str = "cart.shop";
const INTERNAL: &str = "internal.shop";

#[tokio::test]
async fn lists_then_follows_watch_events() {
    let fake = FakeKube::start().await.unwrap();
    seed(&fake);
    let src = KubeSource::start(client(&fake).await, settings(), &mut Registry::default());
    let mut rx = src.local();
    let l = next_local(&mut rx, "the first listing", |l| !l.is_empty()).await;

    let cart = find(&l, CART).unwrap();
    assert!(cart.export);
    assert_eq!(
        cart.ports,
        vec![Port::new(80, Protocol::Tcp), Port::new(5353, Protocol::Udp)]
    );
    assert_eq!(cart.service_type, ServiceType::ClusterSetIP);
    // The cluster IP is what apps dial: sidecars route it as the service.
    assert_eq!(
        cart.vips,
        vec!["10.0.0.1".parse::<std::net::IpAddr>().unwrap()]
    );
    assert_eq!(
        cart.endpoints,
        vec![(
            "10.1.0.5:15006".parse().unwrap(),
            "spiffe://west.mesh/ns/shop/sa/cart".parse().unwrap()
        )],
        "only ready endpoints, at the sidecar port, as the annotated service account"
    );
    assert_eq!(
        cart.audience
            .as_ref()
            .unwrap()
            .iter()
            .map(|c| c.to_string())
            .collect::<Vec<_>>(),
        ["east", "north"]
    );
    assert_eq!(cart.exported_at_ms, Some(1_767_323_045_000));
    let internal = find(&l, INTERNAL).unwrap();
    assert!(!internal.export);
    assert_eq!(
        internal.endpoints[0].1.to_string(),
        "spiffe://west.mesh/ns/shop/sa/default"
    );
    assert!(find(&l, "ext.shop").is_none(), "ExternalName is not served");
    assert!(find(&l, "odd.shop").unwrap().ports.is_empty());
    assert_eq!(src.metrics().skipped("service", "bad_port"), 2);

    // Watch events: a new export, an endpoint turning ready, a deletion.
    fake.put(EXPORTS, export("shop", "internal", None));
    next_local(&mut rx, "internal exported", |l| {
        find(l, INTERNAL).is_some_and(|s| s.export)
    })
    .await;
    fake.put(
        SLICES,
        slice(
            "shop",
            "cart-abc",
            "cart",
            &[("10.1.0.5", true), ("10.1.0.6", true)],
        ),
    );
    next_local(&mut rx, "two cart endpoints", |l| {
        find(l, CART).is_some_and(|s| s.endpoints.len() == 2)
    })
    .await;
    fake.delete(SERVICES, "shop", "internal");
    next_local(&mut rx, "internal gone", |l| find(l, INTERNAL).is_none()).await;

    // A broken watch resumes from the last resourceVersion it saw (a
    // bookmark's), without a new list.
    let rv = fake.resource_version();
    let lists_before = src.metrics().lists("service");
    fake.break_watches();
    tokio::time::timeout(WAIT, async {
        while !fake.requests().iter().any(|r| {
            r.starts_with(&format!("GET {SERVICES}?"))
                && r.contains("watch=true")
                && r.contains(&format!("resourceVersion={rv}"))
        }) {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .expect("the watch did not resume from the bookmark's resourceVersion");
    assert_eq!(
        src.metrics().lists("service"),
        lists_before,
        "resuming must not re-list"
    );
    assert!(fake
        .requests()
        .iter()
        .any(|r| r.contains("allowWatchBookmarks=true")));
}

#[tokio::test]
async fn gone_forces_a_relist_that_leaves_nothing_stale() {
    let fake = FakeKube::start().await.unwrap();
    seed(&fake);
    let src = KubeSource::start(client(&fake).await, settings(), &mut Registry::default());
    let mut rx = src.local();
    next_local(&mut rx, "the first listing", |l| find(l, CART).is_some()).await;
    let lists = src.metrics().lists("service");

    // While the watch is down, cart is deleted and history compacted: the
    // DELETED event can never be delivered. Only a re-list can tell.
    fake.delete(SERVICES, "shop", "cart");
    fake.put(
        SERVICES,
        service("shop", "fresh", json!([{ "port": 1 }]), None),
    );
    fake.compact();
    fake.break_watches();
    let l = next_local(&mut rx, "the re-list", |l| find(l, "fresh.shop").is_some()).await;
    assert!(
        find(&l, CART).is_none(),
        "a deleted service survived the re-list"
    );
    assert!(src.metrics().lists("service") > lists);
    assert!(src.metrics().errors("service") >= 1, "the 410 was not seen");
}

#[tokio::test]
async fn nothing_is_reported_before_every_kind_has_listed() {
    let fake = FakeKube::start().await.unwrap();
    seed(&fake);
    fake.hold(SLICES);
    let src = KubeSource::start(client(&fake).await, settings(), &mut Registry::default());
    let mut rx = src.local();
    // Every value ever reported, to check none came from a partial listing.
    let mut all = src.local();
    let seen = tokio::spawn(async move {
        let mut endpoints = Vec::new();
        while all.changed().await.is_ok() {
            if let Some(l) = all.borrow_and_update().as_ref() {
                endpoints.push(find(l, CART).map(|s| s.endpoints.len()).unwrap_or(0));
            }
            if !endpoints.is_empty() {
                break;
            }
        }
        endpoints
    });
    // Services and exports list at once; without the slices every service
    // would look endpoint-less, so nothing may be reported yet.
    tokio::time::timeout(WAIT, async {
        while src.metrics().lists("service") == 0 || src.metrics().lists("serviceexport") == 0 {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await
    .expect("services and exports never listed");
    assert!(
        rx.borrow().is_none(),
        "reported before EndpointSlices were listed"
    );
    fake.release();
    let l = next_local(&mut rx, "the listing", |l| !l.is_empty()).await;
    assert_eq!(find(&l, CART).unwrap().endpoints.len(), 1);
    assert_eq!(
        seen.await.unwrap(),
        [1],
        "the first value reported lacked the EndpointSlices"
    );
}

#[tokio::test]
async fn an_undecodable_watch_event_is_survived() {
    let fake = FakeKube::start().await.unwrap();
    seed(&fake);
    let src = KubeSource::start(client(&fake).await, settings(), &mut Registry::default());
    let mut rx = src.local();
    next_local(&mut rx, "the first listing", |l| !l.is_empty()).await;
    fake.poison_next_watch(SERVICES);
    fake.break_watches();
    fake.put(
        SERVICES,
        service("shop", "after", json!([{ "port": 2 }]), None),
    );
    next_local(&mut rx, "a change after the bad event", |l| {
        find(l, "after.shop").is_some()
    })
    .await;
    assert!(src.metrics().errors("service") >= 1);
}

const IMPORTS: &str = "/apis/multicluster.x-k8s.io/v1beta1/serviceimports";

fn view(imports: &[(&str, &[&str])], conflict: bool) -> McsView {
    let mut v = McsView {
        computed: true,
        ..McsView::default()
    };
    v.published.insert(CART.parse().unwrap());
    for (name, clusters) in imports {
        let service: ServiceName = name.parse().unwrap();
        let clusters: Vec<ClusterName> = clusters
            .iter()
            .map(|c| ClusterName::new(c).unwrap())
            .collect();
        v.imports.insert(
            service.clone(),
            mcs::Import {
                service,
                service_type: ServiceType::ClusterSetIP,
                ports: vec![Port::named("http", 80, Protocol::Tcp)],
                meta: Default::default(),
                exporters: clusters.clone(),
                clusters,
                conflicts: vec![],
                endpoints: Default::default(),
            },
        );
    }
    if conflict {
        v.export_conflicts.insert(
            CART.parse().unwrap(),
            vec![mcs::Conflict {
                kind: mcs::ConflictKind::Port {
                    name: "http".into(),
                    port: 81,
                },
                winner: "east".into(),
                loser: "west".into(),
            }],
        );
    }
    v
}

/// Polls `f` every 20 ms until it holds (at most [`WAIT`]).
async fn until(what: &str, fake: &FakeKube, f: impl Fn(&FakeKube) -> bool) {
    tokio::time::timeout(WAIT, async {
        while !f(fake) {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .unwrap_or_else(|_| panic!("timed out waiting for {what}: {:#?}", fake.writes()));
}

/// `type` → (status, reason, lastTransitionTime) of an export's conditions.
fn conditions(fake: &FakeKube, ns: &str, name: &str) -> BTreeMap<String, (String, String, String)> {
    let o = fake.get(EXPORTS, ns, name).unwrap_or_default();
    o["status"]["conditions"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|c| {
            let f = |k: &str| c[k].as_str().unwrap_or_default().to_owned();
            (
                f("type"),
                (f("status"), f("reason"), f("lastTransitionTime")),
            )
        })
        .collect()
}

fn cond(fake: &FakeKube, ns: &str, name: &str, ty: &str) -> (String, String) {
    let c = conditions(fake, ns, name);
    c.get(ty)
        .map(|c| (c.0.clone(), c.1.clone()))
        .unwrap_or_default()
}

fn pair(status: &str, reason: &str) -> (String, String) {
    (status.to_owned(), reason.to_owned())
}

/// Writes so far to paths ending in `suffix`.
fn writes_to(fake: &FakeKube, suffix: &str) -> usize {
    fake.writes()
        .iter()
        .filter(|w| w.path.ends_with(suffix))
        .count()
}

#[tokio::test]
async fn service_imports_and_export_conditions_are_written_back_once() {
    let fake = FakeKube::start().await.unwrap();
    seed(&fake);
    // Exports that cannot be valid, one reason each.
    fake.put(EXPORTS, export("shop", "ext", None));
    fake.put(EXPORTS, export("shop", "ghost", None));
    fake.put(
        SERVICES,
        service("kube-system", "dns", json!([{ "port": 53 }]), None),
    );
    fake.put(EXPORTS, export("kube-system", "dns", None));
    let metrics = k8s::KubeMetrics::default();
    let src = KubeSource::start(client(&fake).await, settings(), &mut Registry::default());
    let (mcs_tx, mcs_rx) = watch::channel(Arc::new(view(
        &[("web.shop.svc.clusterset.local", &["east"])],
        false,
    )));
    let kube = client(&fake).await;
    let start = |mcs_rx| {
        k8s::write_back(
            kube.clone(),
            mcs_rx,
            src.exports(),
            None,
            metrics.clone(),
            Duration::from_millis(200),
        )
    };
    let w = start(mcs_rx.clone());

    until("ServiceImport web", &fake, |f| {
        f.get(IMPORTS, "shop", "web")
            .is_some_and(|o| o["status"]["clusters"][0]["cluster"] == "east")
    })
    .await;
    let web = fake.get(IMPORTS, "shop", "web").unwrap();
    assert_eq!(web["apiVersion"], "multicluster.x-k8s.io/v1beta1");
    assert_eq!(
        web["spec"]["ports"][0],
        json!({ "name": "http", "port": 80, "protocol": "TCP" })
    );
    assert_eq!(web["spec"]["sessionAffinity"], "None");
    assert_eq!(
        web["metadata"]["labels"]["app.kubernetes.io/managed-by"],
        "fedmesh"
    );
    // Written in the version the CRDs store (mcs-api v0.5.0: v1beta1).
    assert!(fake
        .writes()
        .iter()
        .all(|w| w.path.contains("/multicluster.x-k8s.io/v1beta1/")));

    until("cart's conditions", &fake, |f| {
        conditions(f, "shop", "cart").len() == 3
    })
    .await;
    assert_eq!(cond(&fake, "shop", "cart", "Valid"), pair("True", "Valid"));
    assert_eq!(
        cond(&fake, "shop", "cart", "Ready"),
        pair("True", "Exported")
    );
    assert_eq!(
        cond(&fake, "shop", "cart", "Conflict"),
        pair("False", "NoConflicts")
    );
    // Each invalid export says why with the v1beta1 reason (or fedmesh's).
    for (ns, name, reason) in [
        ("shop", "ext", "InvalidServiceType"),
        ("shop", "ghost", "NoService"),
        ("kube-system", "dns", "NamespaceExcluded"),
    ] {
        until(reason, &fake, |f| {
            cond(f, ns, name, "Valid") == pair("False", reason)
        })
        .await;
        assert_eq!(cond(&fake, ns, name, "Ready"), pair("False", "Failed"));
        assert!(!conditions(&fake, ns, name).contains_key("Conflict"));
    }
    assert!(fake.get(IMPORTS, "shop", "ext").is_none());

    // Settled: the same view again writes nothing, and neither does
    // anything else for a while (no retry loop on the refused exports).
    let settled = fake.writes().len();
    mcs_tx.send_replace(Arc::new(view(
        &[("web.shop.svc.clusterset.local", &["east"])],
        false,
    )));
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(
        fake.writes().len(),
        settled,
        "{:#?}",
        &fake.writes()[settled..]
    );
    for path in ["/ext/status", "/ghost/status", "/dns/status"] {
        assert_eq!(writes_to(&fake, path), 1, "{path}");
    }

    // A restart that changes nothing writes nothing.
    w.abort();
    let w = start(mcs_rx.clone());
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(
        fake.writes().len(),
        settled,
        "{:#?}",
        &fake.writes()[settled..]
    );

    // Hand edits are put back: a ServiceImport's ports, an export's status.
    let mut edited = fake.get(IMPORTS, "shop", "web").unwrap();
    edited["spec"]["ports"] = json!([{ "port": 9999, "protocol": "TCP" }]);
    fake.put(IMPORTS, edited);
    let mut edited = fake.get(EXPORTS, "shop", "cart").unwrap();
    edited["status"]["conditions"] = json!([{ "type": "Conflict", "status": "True",
        "reason": "Forged", "message": "", "lastTransitionTime": "2020-01-01T00:00:00Z" }]);
    fake.put(EXPORTS, edited);
    until("web's ports put back", &fake, |f| {
        f.get(IMPORTS, "shop", "web").unwrap()["spec"]["ports"][0]["port"] == 80
    })
    .await;
    until("cart's conditions put back", &fake, |f| {
        cond(f, "shop", "cart", "Conflict") == pair("False", "NoConflicts")
            && conditions(f, "shop", "cart").len() == 3
    })
    .await;

    // web goes away, api arrives, cart's export now has a port conflict:
    // only the Conflict condition's transition time moves.
    let before = conditions(&fake, "shop", "cart");
    tokio::time::sleep(Duration::from_millis(1100)).await;
    mcs_tx.send_replace(Arc::new(view(
        &[("api.shop.svc.clusterset.local", &["north"])],
        true,
    )));
    until("web deleted", &fake, |f| {
        f.get(IMPORTS, "shop", "web").is_none()
    })
    .await;
    until("api applied", &fake, |f| {
        f.get(IMPORTS, "shop", "api").is_some()
    })
    .await;
    until("Conflict=True", &fake, |f| {
        cond(f, "shop", "cart", "Conflict") == pair("True", "PortConflict")
    })
    .await;
    let after = conditions(&fake, "shop", "cart");
    assert_eq!(after["Valid"], before["Valid"]);
    assert_eq!(after["Ready"], before["Ready"]);
    assert_ne!(after["Conflict"].2, before["Conflict"].2);
    // ServiceImports fedmesh does not own are left alone.
    fake.put(
        IMPORTS,
        json!({ "apiVersion": "multicluster.x-k8s.io/v1beta1", "kind": "ServiceImport",
                "metadata": { "name": "other", "namespace": "shop" },
                "spec": { "type": "ClusterSetIP", "ports": [] } }),
    );
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(fake.get(IMPORTS, "shop", "other").is_some());
    assert_eq!(metrics.writes("serviceimport", "delete"), 1);
    w.abort();
}

/// A cluster whose exports were written as v1alpha1 (before mcs-api
/// v0.5.0): with both versions served from one storage, as the CRDs
/// `fedmesh install` renders do, the controller reads them as v1beta1.
#[tokio::test]
async fn exports_written_as_v1alpha1_are_read_through_v1beta1() {
    let fake = FakeKube::start().await.unwrap();
    seed(&fake);
    fake.delete(EXPORTS, "shop", "cart");
    let mut old = export("shop", "cart", None);
    old["apiVersion"] = json!("multicluster.x-k8s.io/v1alpha1");
    fake.put("/apis/multicluster.x-k8s.io/v1alpha1/serviceexports", old);
    let src = KubeSource::start(client(&fake).await, settings(), &mut Registry::default());
    let mut rx = src.local();
    let l = next_local(&mut rx, "cart exported", |l| {
        find(l, CART).is_some_and(|c| c.export)
    })
    .await;
    assert!(!find(&l, INTERNAL).unwrap().export);
    // The controller asked for the stored version only.
    let requests = fake.requests();
    assert!(requests
        .iter()
        .any(|r| r.contains("/multicluster.x-k8s.io/v1beta1/serviceexports")));
    assert!(
        !requests.iter().any(|r| r.contains("/v1alpha1/")),
        "{requests:#?}"
    );
}

/// kind's (kubeadm's) Corefile, as a cluster starts with it.
const COREFILE: &str = ".:53 {\n    errors\n    kubernetes cluster.local in-addr.arpa ip6.arpa {\n       pods insecure\n    }\n    forward . /etc/resolv.conf\n    cache 30\n    reload\n}\n";
const COREDNS: &str = "/api/v1/namespaces/kube-system/configmaps/coredns";

fn corefile(fake: &FakeKube) -> String {
    fake.object(COREDNS).unwrap()["data"]["Corefile"]
        .as_str()
        .unwrap_or_default()
        .to_owned()
}

fn dns_service(ip: &str) -> serde_json::Value {
    json!({ "apiVersion": "v1", "kind": "Service",
            "metadata": { "name": "fedmesh-dns", "namespace": "fedmesh-system" },
            "spec": { "clusterIP": ip, "ports": [
                { "name": "dns-tcp", "port": 53, "protocol": "TCP", "targetPort": 5353 },
                { "name": "dns-udp", "port": 53, "protocol": "UDP", "targetPort": 5353 } ] } })
}

/// `kubernetes.coredns`: CoreDNS's Corefile gets a `clusterset.local`
/// block forwarding to the DNS Service, kept there against edits and moved
/// with the Service's IP; a block someone else wrote is left alone (and
/// reported), and the rest of the Corefile is never touched.
#[tokio::test]
async fn coredns_forwards_clusterset_local_to_the_dns_service_and_keeps_it_so() {
    use fedmesh_federation::k8s::coredns::{keep_forward, CorednsSettings, BEGIN};
    let fake = FakeKube::start().await.unwrap();
    fake.put_configmap("kube-system", "coredns", json!({ "Corefile": COREFILE }));
    let metrics = k8s::KubeMetrics::default();
    let s = CorednsSettings {
        configmap: ("kube-system".into(), "coredns".into()),
        dns_service: ("fedmesh-system".into(), "fedmesh-dns".into()),
        resync: Duration::from_millis(100),
    };
    let _task = keep_forward(client(&fake).await, s, metrics.clone());
    // Nothing to forward to before the Service exists.
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(corefile(&fake), COREFILE);
    fake.put(SERVICES, dns_service("10.96.0.53"));
    until("the forward", &fake, |f| {
        corefile(f).contains("forward . 10.96.0.53:53")
    })
    .await;
    let c = corefile(&fake);
    assert!(c.starts_with(COREFILE), "{c}");
    assert!(c.contains("clusterset.local:53 {"), "{c}");
    // The write is counted once the API server answered it.
    let count = async |n: u64| {
        let t = std::time::Instant::now();
        while metrics.writes("configmap", "coredns") < n {
            assert!(t.elapsed() < WAIT, "write {n} not counted");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    };
    count(1).await;
    // Nothing changes: nothing is written.
    tokio::time::sleep(Duration::from_millis(400)).await;
    assert_eq!(metrics.writes("configmap", "coredns"), 1);
    // Edited away by hand: put back.
    fake.put_configmap("kube-system", "coredns", json!({ "Corefile": COREFILE }));
    until("the block put back", &fake, |f| corefile(f).contains(BEGIN)).await;
    // The Service's IP changes: the block follows.
    fake.put(SERVICES, dns_service("10.96.0.54"));
    until("the new address", &fake, |f| {
        corefile(f).contains("forward . 10.96.0.54:53")
    })
    .await;
    assert_eq!(corefile(&fake).matches(BEGIN).count(), 1);
    // Someone else serves clusterset.local: left alone, reported.
    let foreign = format!("{COREFILE}clusterset.local:53 {{\n    forward . 10.0.0.9\n}}\n");
    fake.put_configmap("kube-system", "coredns", json!({ "Corefile": foreign }));
    let t = std::time::Instant::now();
    while metrics.skipped("configmap", "coredns") != 1 {
        assert!(t.elapsed() < WAIT, "the foreign block was not reported");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(corefile(&fake), foreign);
    count(3).await;
    assert_eq!(metrics.writes("configmap", "coredns"), 3);
}
