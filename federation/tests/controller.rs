//! Controllers converging through a store: catalogs, failover by lease
//! expiry, bad store values, and trust bundle admission and rotation.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::cloned_ref_to_slice_refs
)]

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use fedmesh_catalog::mcs::{Port, Protocol, ServiceType};
use fedmesh_catalog::{Catalog, ClusterName};
use fedmesh_federation::records::Locality;
use fedmesh_federation::store::{EmbeddedLimits, EmbeddedStore};
use fedmesh_federation::{Controller, ControllerSettings, LocalService, Store};
use fedmesh_trust::{CertificateAuthority, TrustDomain};
use fedmesh_wire::ServiceName;
use prometheus_client::registry::Registry;

const TTL: Duration = Duration::from_secs(1);

struct Member {
    name: ClusterName,
    ca: CertificateAuthority,
}

fn member(name: &str) -> Member {
    let td = TrustDomain::new(&format!("{name}.acme")).unwrap();
    Member {
        name: ClusterName::new(name).unwrap(),
        ca: CertificateAuthority::new_root(td, Duration::from_secs(86_400)).unwrap(),
    }
}

fn echo(m: &Member, export: bool) -> LocalService {
    LocalService {
        vips: Vec::new(),
        hostnames: Default::default(),
        name: ServiceName::new("echo", "shop").unwrap(),
        ports: vec![Port::new(8080, Protocol::Tcp)],
        meta: Default::default(),
        service_type: ServiceType::ClusterSetIP,
        export,
        audience: None,
        endpoints: vec![(
            "127.0.0.1:9000".parse().unwrap(),
            m.ca.trust_domain().workload("shop", "echo").unwrap(),
        )],
        exported_at_ms: None,
    }
}

fn settings(m: &Member, all: &[&Member], port: u16) -> ControllerSettings {
    ControllerSettings {
        cluster: m.name.clone(),
        trust_domain: m.ca.trust_domain().clone(),
        locality: Locality::default(),
        gateways: vec![format!("127.0.0.1:{port}").parse().unwrap()],
        gateways_tcp: vec![format!("127.0.0.1:{}", port + 2).parse().unwrap()],
        gateway_tunnel: Some(format!("127.0.0.1:{}", port + 1).parse().unwrap()),
        lease_ttl: TTL,
        bundle: m.ca.bundle(),
        endorsements: vec![],
        // The operator joined every other cluster.
        pinned: all
            .iter()
            .filter(|o| o.name != m.name)
            .map(|o| (o.name.clone(), o.ca.bundle()))
            .collect::<BTreeMap<_, _>>(),
        policies: Default::default(),
        clusterset_ips: None,
    }
}

/// Waits (bounded) until `pred` holds for the controller's catalog.
async fn until(
    c: &Controller,
    what: &str,
    limit: Duration,
    pred: impl Fn(&Catalog) -> bool,
) -> Duration {
    let t0 = Instant::now();
    let mut rx = c.catalog();
    loop {
        if rx.borrow().as_deref().is_some_and(&pred) {
            return t0.elapsed();
        }
        let left = limit
            .checked_sub(t0.elapsed())
            .unwrap_or_else(|| panic!("{what}: not within {limit:?}"));
        let _ = tokio::time::timeout(left, rx.changed()).await;
    }
}

/// What `c` reports about `cluster`, once it has seen it (5 s at most).
async fn seen(c: &Controller, cluster: &str) -> fedmesh_federation::controller::ClusterStatus {
    let t0 = Instant::now();
    loop {
        if let Some(s) = c
            .status()
            .clusters
            .into_iter()
            .find(|s| s.cluster == cluster)
        {
            return s;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(5),
            "{cluster} never seen"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn svc() -> ServiceName {
    ServiceName::new("echo", "shop").unwrap()
}

/// `east`'s policy for echo.shop: stop routing to a cluster this long
/// after its lease expired.
fn fail_closed_after(mut s: ControllerSettings, after: &str) -> ControllerSettings {
    let p: fedmesh_catalog::ServicePolicy =
        serde_yaml_ng::from_str(&format!("partition: {{ fail_closed_after: {after} }}")).unwrap();
    s.policies.insert(svc(), Arc::new(p));
    s
}

async fn three_converge_then_one_dies(store: Arc<dyn Store>) {
    let (e, w, n) = (member("east"), member("west"), member("north"));
    let all = [&e, &w, &n];
    let mut reg = Registry::default();
    let ce = Controller::start(
        store.clone(),
        fail_closed_after(settings(&e, &all, 1000), "500ms"),
        vec![],
        &mut reg,
    );
    let cw = Controller::start(
        store.clone(),
        settings(&w, &all, 2000),
        vec![echo(&w, true)],
        &mut reg,
    );
    let cn = Controller::start(
        store.clone(),
        settings(&n, &all, 3000),
        vec![echo(&n, true)],
        &mut reg,
    );
    let took = until(
        &ce,
        "east imports echo from west and north",
        Duration::from_secs(10),
        |c| c.imports(&svc()).len() == 2 && c.peers().count() == 2,
    )
    .await;
    eprintln!("converged in {took:?}");
    // Peers carry both transports' addresses as each cluster published them.
    let catalog = ce.catalog().borrow().clone().unwrap();
    let peer_n = catalog.peer(&n.name).unwrap();
    assert_eq!(peer_n.address, "127.0.0.1:3000".parse().unwrap());
    assert_eq!(peer_n.tcp_address, Some("127.0.0.1:3002".parse().unwrap()));
    // west sees north's export (and serves its own locally).
    until(
        &cw,
        "west imports from north",
        Duration::from_secs(5),
        |c| c.imports(&svc()) == [n.name.clone()] && c.service(&svc()).is_some(),
    )
    .await;
    // Trust followed the pins: east trusts all three domains.
    assert_eq!(ce.bundles().borrow().len(), 3);
    let st = ce.status();
    assert!(st.synced);
    assert_eq!(st.clusters.len(), 2);
    assert!(st
        .clusters
        .iter()
        .all(|c| c.bundle_trusted && c.exported == 1));

    // north dies without a word: its lease expires, and 500 ms later (the
    // partition policy) it drops out.
    let t0 = Instant::now();
    drop(cn);
    until(
        &ce,
        "north's export expires",
        TTL + Duration::from_secs(4),
        |c| c.imports(&svc()) == [w.name.clone()] && c.peers().count() == 1,
    )
    .await;
    let gone = t0.elapsed();
    assert!(
        gone >= TTL && gone <= TTL + Duration::from_millis(3000),
        "took {gone:?}"
    );
    assert!(ce.status().stale.is_empty());
    // west leaves the federation: gone at once, not after the TTL.
    let t0 = Instant::now();
    cw.leave().await;
    until(&ce, "west's export revoked", Duration::from_secs(1), |c| {
        c.imports(&svc()).is_empty()
    })
    .await;
    assert!(t0.elapsed() < Duration::from_millis(900));
}

/// The default partition policy (`serve_stale`): a cluster whose lease
/// expired keeps being routed to (its gateway decides by answering or
/// not) until it comes back; one that leaves on purpose is dropped at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_partitioned_cluster_is_served_stale_until_it_returns() {
    let store: Arc<dyn Store> = Arc::new(EmbeddedStore::new(EmbeddedLimits::default()));
    let (e, w, n) = (member("east"), member("west"), member("north"));
    let all = [&e, &w, &n];
    let mut reg = Registry::default();
    let ce = Controller::start(store.clone(), settings(&e, &all, 1000), vec![], &mut reg);
    let cw = Controller::start(
        store.clone(),
        settings(&w, &all, 2000),
        vec![echo(&w, true)],
        &mut reg,
    );
    let cn = Controller::start(
        store.clone(),
        settings(&n, &all, 3000),
        vec![echo(&n, true)],
        &mut reg,
    );
    let both = |c: &Catalog| c.imports(&svc()).len() == 2 && c.peers().count() == 2;
    until(&ce, "east imports from both", Duration::from_secs(10), both).await;

    drop(cn);
    // Well past the lease: still routed, and reported as stale.
    let t0 = Instant::now();
    loop {
        let st = ce.status();
        if st.stale.contains_key("north") {
            break;
        }
        assert!(
            t0.elapsed() < TTL + Duration::from_secs(3),
            "north never went stale: {st:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    let c = ce.catalog().borrow().clone().unwrap();
    assert!(
        both(&c),
        "north must still be routed: {:?}",
        c.imports(&svc())
    );
    assert!(ce.status().clusters.iter().all(|c| c.cluster != "north"));

    // north comes back: no longer stale, still imported.
    let cn = Controller::start(
        store.clone(),
        settings(&n, &all, 3000),
        vec![echo(&n, true)],
        &mut reg,
    );
    let t0 = Instant::now();
    while !ce.status().stale.is_empty() {
        assert!(
            t0.elapsed() < Duration::from_secs(5),
            "north stayed stale after it came back"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // Never a moment without north while it republishes.
    let mut rx = ce.catalog();
    let t0 = Instant::now();
    while t0.elapsed() < TTL * 2 {
        assert!(both(&rx.borrow_and_update().clone().unwrap()));
        let _ = tokio::time::timeout(Duration::from_millis(100), rx.changed()).await;
    }

    // Leaving on purpose is not a partition: gone at once.
    cn.leave().await;
    until(&ce, "north left", Duration::from_secs(1), |c| {
        c.imports(&svc()) == [w.name.clone()] && c.peers().count() == 1
    })
    .await;
    assert!(ce.status().stale.is_empty());
    drop(cw);
}

/// A controller stopped for a restart (SIGTERM, an upgrade) leaves its
/// keys to the lease: a successor that starts within the TTL takes them
/// over and peers never see the cluster go or go stale.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_controller_is_never_missed_by_its_peers() {
    let store: Arc<dyn Store> = Arc::new(EmbeddedStore::new(EmbeddedLimits::default()));
    let (e, w) = (member("east"), member("west"));
    let all = [&e, &w];
    let mut reg = Registry::default();
    let ce = Controller::start(store.clone(), settings(&e, &all, 1000), vec![], &mut reg);
    let cw = Controller::start(
        store.clone(),
        settings(&w, &all, 2000),
        vec![echo(&w, true)],
        &mut reg,
    );
    let has_west = |c: &Catalog| c.imports(&svc()) == [w.name.clone()] && c.peers().count() == 1;
    until(
        &ce,
        "east imports from west",
        Duration::from_secs(10),
        has_west,
    )
    .await;
    cw.shutdown().await;
    tokio::time::sleep(TTL / 2).await;
    let mut reg2 = Registry::default();
    let cw = Controller::start(
        store.clone(),
        settings(&w, &all, 2000),
        vec![echo(&w, true)],
        &mut reg2,
    );
    // Past the old lease's TTL several times over: never without west,
    // never stale.
    let mut rx = ce.catalog();
    let t0 = Instant::now();
    while t0.elapsed() < TTL * 3 {
        assert!(
            has_west(&rx.borrow_and_update().clone().unwrap()),
            "east lost west during its controller's restart"
        );
        assert!(
            ce.status().stale.is_empty(),
            "west went stale during a restart"
        );
        let _ = tokio::time::timeout(Duration::from_millis(50), rx.changed()).await;
    }
    drop(cw);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn embedded_three_controllers_converge_and_expire() {
    three_converge_then_one_dies(Arc::new(EmbeddedStore::new(EmbeddedLimits::default()))).await;
}

#[cfg(feature = "etcd")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etcd_three_controllers_converge_and_expire() {
    use fedmesh_federation::store::{EtcdOptions, EtcdStore};
    let Some(bin) =
        fedmesh_testkit::etcd::etcd_or_skip("etcd_three_controllers_converge_and_expire")
    else {
        return;
    };
    let etcd = fedmesh_testkit::etcd::EtcdCluster::start(bin, 1).unwrap();
    let store = EtcdStore::connect(&EtcdOptions {
        endpoints: etcd.endpoints(),
        ..EtcdOptions::default()
    })
    .await
    .unwrap();
    three_converge_then_one_dies(Arc::new(store)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_store_values_are_rejected_and_nothing_else_is_lost() {
    let store: Arc<dyn Store> = Arc::new(EmbeddedStore::new(EmbeddedLimits::default()));
    let (e, w) = (member("east"), member("west"));
    let all = [&e, &w];
    let mut reg = Registry::default();
    let ce = Controller::start(store.clone(), settings(&e, &all, 1000), vec![], &mut reg);
    let _cw = Controller::start(
        store.clone(),
        settings(&w, &all, 2000),
        vec![echo(&w, true)],
        &mut reg,
    );
    until(&ce, "east imports from west", Duration::from_secs(5), |c| {
        c.imports(&svc()).len() == 1
    })
    .await;
    // Garbage from someone with write access to the store.
    store
        .put(
            "/fedmesh/v1/clusters/west/services/shop/broken",
            b"{not json".to_vec(),
            None,
        )
        .await
        .unwrap();
    store.put("/fedmesh/v1/clusters/west/services/shop/liar", br#"{"name":"echo","namespace":"shop","ports":[{"port":1}],"exported_at_ms":0,"ready_endpoints":1}"#.to_vec(), None).await.unwrap();
    store
        .put("/fedmesh/v1/clusters/west/what", b"?".to_vec(), None)
        .await
        .unwrap();
    store
        .put("/fedmesh/v1/clusters/mars/info", b"{}".to_vec(), None)
        .await
        .unwrap();
    // Wait for the status (updated after the recompute that follows the
    // counters) to list all four refusals.
    let t0 = Instant::now();
    while ce.status().rejected.len() < 4 {
        assert!(
            t0.elapsed() < Duration::from_secs(5),
            "rejections not reported: {:?}",
            ce.status().rejected
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(ce.metrics().rejected_count("bad_record") >= 3);
    assert!(ce.metrics().rejected_count("bad_key") >= 1);
    let st = ce.status();
    assert!(
        st.rejected.iter().any(|r| r.contains("does not decode")),
        "{:?}",
        st.rejected
    );
    assert!(
        st.rejected.iter().any(|r| r.contains("its key says")),
        "{:?}",
        st.rejected
    );
    // What was accepted before is still there.
    assert_eq!(
        ce.catalog().borrow().as_ref().unwrap().imports(&svc()),
        [w.name.clone()]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unpinned_or_unendorsed_bundles_are_not_trusted() {
    let store: Arc<dyn Store> = Arc::new(EmbeddedStore::new(EmbeddedLimits::default()));
    let (e, w, n) = (member("east"), member("west"), member("north"));
    let mut reg = Registry::default();
    // east pinned west only; north is not joined.
    let ce = Controller::start(
        store.clone(),
        settings(&e, &[&e, &w], 1000),
        vec![],
        &mut reg,
    );
    let cw = Controller::start(
        store.clone(),
        settings(&w, &[&e, &w], 2000),
        vec![echo(&w, true)],
        &mut reg,
    );
    let _cn = Controller::start(
        store.clone(),
        settings(&n, &[&n], 3000),
        vec![echo(&n, true)],
        &mut reg,
    );
    until(&ce, "west imported", Duration::from_secs(5), |c| {
        c.imports(&svc()).len() == 1
    })
    .await;
    let north = seen(&ce, "north").await;
    assert!(!north.bundle_trusted);
    assert_eq!(
        ce.catalog().borrow().as_ref().unwrap().imports(&svc()),
        [w.name.clone()]
    );
    assert!(ce.metrics().rejected_count("bundle_not_trusted") >= 1);

    // west rotates: overlap bundle endorsed by its old root is accepted.
    cw.shutdown().await;
    let new_root =
        CertificateAuthority::new_root(w.ca.trust_domain().clone(), Duration::from_secs(3600))
            .unwrap();
    let overlap = fedmesh_trust::TrustBundle::new(
        w.ca.trust_domain().clone(),
        vec![w.ca.certificate().clone(), new_root.certificate().clone()],
    )
    .unwrap();
    let mut s = settings(&w, &[&e, &w], 2000);
    s.bundle = overlap.clone();
    s.endorsements = vec![fedmesh_trust::rotation::endorse(&w.ca, &overlap).unwrap()];
    let _cw2 = Controller::start(store.clone(), s, vec![echo(&w, true)], &mut reg);
    let t0 = Instant::now();
    loop {
        if ce.bundles().borrow().get(w.ca.trust_domain()) == Some(&overlap) {
            break;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(5),
            "rotation not accepted"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // A writer to the store forging west's info with a rogue root, no
    // endorsement: refused, the overlap bundle stays trusted.
    let rogue =
        CertificateAuthority::new_root(w.ca.trust_domain().clone(), Duration::from_secs(3600))
            .unwrap();
    let forged = serde_json::json!({
        "cluster": "west", "trust_domain": "west.acme", "gateways": ["127.0.0.1:2000"],
        "bundle_pem": rogue.bundle().to_pem(), "published_at_ms": 1,
    });
    let before = ce.metrics().rejected_count("bundle_not_trusted");
    store
        .put(
            "/fedmesh/v1/clusters/west/info",
            forged.to_string().into_bytes(),
            None,
        )
        .await
        .unwrap();
    let t0 = Instant::now();
    while ce.metrics().rejected_count("bundle_not_trusted") == before {
        assert!(t0.elapsed() < Duration::from_secs(5));
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(
        ce.bundles().borrow().get(w.ca.trust_domain()),
        Some(&overlap)
    );
    // And west is no longer routable while its info is untrusted.
    until(
        &ce,
        "forged west dropped from routing",
        Duration::from_secs(2),
        |c| c.imports(&svc()).is_empty(),
    )
    .await;
}

#[cfg(feature = "etcd")]
async fn etcd_store(endpoints: Vec<String>) -> Arc<dyn Store> {
    use fedmesh_federation::store::{EtcdOptions, EtcdStore};
    Arc::new(
        EtcdStore::connect(&EtcdOptions {
            endpoints,
            connect_timeout: Duration::from_secs(2),
            request_timeout: Duration::from_secs(2),
            tls: None,
            ..EtcdOptions::default()
        })
        .await
        .unwrap(),
    )
}

#[cfg(feature = "etcd")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etcd_restart_loses_nothing_and_everyone_resyncs() {
    let Some(bin) =
        fedmesh_testkit::etcd::etcd_or_skip("etcd_restart_loses_nothing_and_everyone_resyncs")
    else {
        return;
    };
    let mut etcd = fedmesh_testkit::etcd::EtcdCluster::start(bin, 1).unwrap();
    let (e, w, n) = (member("east"), member("west"), member("north"));
    let all = [&e, &w, &n];
    let mut reg = Registry::default();
    let mk = |m: &Member, port| settings(m, &all, port);
    let ce = Controller::start(
        etcd_store(etcd.endpoints()).await,
        mk(&e, 1000),
        vec![],
        &mut reg,
    );
    let cw = Controller::start(
        etcd_store(etcd.endpoints()).await,
        mk(&w, 2000),
        vec![echo(&w, true)],
        &mut reg,
    );
    let _cn = Controller::start(
        etcd_store(etcd.endpoints()).await,
        mk(&n, 3000),
        vec![echo(&n, true)],
        &mut reg,
    );
    until(&ce, "converged", Duration::from_secs(10), |c| {
        c.imports(&svc()).len() == 2
    })
    .await;
    etcd.kill(0);
    // While etcd is down, the last catalog stays (static stability).
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(
        ce.catalog()
            .borrow()
            .as_ref()
            .unwrap()
            .imports(&svc())
            .len(),
        2
    );
    // A change made during the outage reaches everyone after the restart.
    cw.set_local(vec![]);
    etcd.restart(0).unwrap();
    let took = until(
        &ce,
        "resynced after the restart",
        Duration::from_secs(20),
        |c| c.imports(&svc()) == [n.name.clone()],
    )
    .await;
    eprintln!("resynced {took:?} after restart");
    cw.set_local(vec![echo(&w, true)]);
    until(&ce, "west exports again", Duration::from_secs(10), |c| {
        c.imports(&svc()).len() == 2
    })
    .await;
}

#[cfg(feature = "etcd")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_member_etcd_survives_losing_one() {
    let Some(bin) = fedmesh_testkit::etcd::etcd_or_skip("three_member_etcd_survives_losing_one")
    else {
        return;
    };
    let mut etcd = fedmesh_testkit::etcd::EtcdCluster::start(bin, 3).unwrap();
    let (e, w) = (member("east"), member("west"));
    let all = [&e, &w];
    let mut reg = Registry::default();
    // A realistic ratio of lease to request time (production default: 10 s).
    let ttl = Duration::from_secs(3);
    let mut se = settings(&e, &all, 1000);
    se.lease_ttl = ttl;
    let mut sw = settings(&w, &all, 2000);
    sw.lease_ttl = ttl;
    let ce = Controller::start(etcd_store(etcd.endpoints()).await, se, vec![], &mut reg);
    let cw = Controller::start(
        etcd_store(etcd.endpoints()).await,
        sw,
        vec![echo(&w, true)],
        &mut reg,
    );
    until(&ce, "converged", Duration::from_secs(15), |c| {
        c.imports(&svc()).len() == 1
    })
    .await;
    etcd.kill(0);
    // Catalog updates keep flowing through the two remaining members.
    cw.set_local(vec![]);
    until(
        &ce,
        "withdrawal seen with a member down",
        Duration::from_secs(15),
        |c| c.imports(&svc()).is_empty(),
    )
    .await;
    cw.set_local(vec![echo(&w, true)]);
    until(
        &ce,
        "export seen with a member down",
        Duration::from_secs(15),
        |c| c.imports(&svc()).len() == 1,
    )
    .await;
    // And nothing expired: west's lease is kept alive throughout.
    tokio::time::sleep(ttl * 2).await;
    assert_eq!(
        ce.catalog()
            .borrow()
            .as_ref()
            .unwrap()
            .imports(&svc())
            .len(),
        1
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cluster_whose_gateway_address_is_discovered_joins_when_it_has_one() {
    let store: Arc<dyn Store> = Arc::new(EmbeddedStore::new(EmbeddedLimits::default()));
    let (e, w) = (member("east"), member("west"));
    let all = [&e, &w];
    let mut reg = Registry::default();
    let ce = Controller::start(store.clone(), settings(&e, &all, 1000), vec![], &mut reg);
    // West's load balancer has no address yet: nothing is published.
    let mut ws = settings(&w, &all, 2000);
    ws.gateways.clear();
    ws.gateways_tcp.clear();
    let cw = Controller::start(store.clone(), ws, vec![echo(&w, true)], &mut reg);
    tokio::time::sleep(TTL).await;
    let west_info = store.list("/fedmesh/v1/clusters/west/").await.unwrap().kvs;
    assert!(west_info.is_empty(), "published before it had an address");
    assert!(ce
        .catalog()
        .borrow()
        .as_ref()
        .is_some_and(|c| c.peers().count() == 0));
    // The address arrives: west joins, reachable there.
    let quic: std::net::SocketAddr = "203.0.113.7:15443".parse().unwrap();
    let tcp: std::net::SocketAddr = "203.0.113.7:15444".parse().unwrap();
    cw.set_gateways(fedmesh_federation::Gateways {
        quic: vec![quic],
        tcp: vec![tcp],
    });
    until(
        &ce,
        "east sees west at its load balancer",
        Duration::from_secs(10),
        |c| {
            c.peer(&w.name)
                .is_some_and(|p| p.address == quic && p.tcp_address == Some(tcp))
                && c.imports(&svc()) == [w.name.clone()]
        },
    )
    .await;
    // It moves: peers follow.
    let moved: std::net::SocketAddr = "203.0.113.8:15443".parse().unwrap();
    cw.set_gateways(fedmesh_federation::Gateways {
        quic: vec![moved],
        tcp: vec![],
    });
    until(
        &ce,
        "east follows west's new address",
        Duration::from_secs(10),
        |c| {
            c.peer(&w.name)
                .is_some_and(|p| p.address == moved && p.tcp_address.is_none())
        },
    )
    .await;
}

/// A peer is routed to only once it says it trusts us, and by then its
/// controller hands our bundle to its gateways: a dial never meets a
/// gateway that would refuse our certificate.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cluster_is_routed_to_only_once_it_trusts_us() {
    let store: Arc<dyn Store> = Arc::new(EmbeddedStore::new(EmbeddedLimits::default()));
    let (e, w) = (member("east"), member("west"));
    let mut reg = Registry::default();
    let ce = Controller::start(
        store.clone(),
        settings(&e, &[&e, &w], 1000),
        vec![],
        &mut reg,
    );
    // west has not joined east yet: it trusts only itself.
    let cw = Controller::start(
        store.clone(),
        settings(&w, &[&w], 2000),
        vec![echo(&w, true)],
        &mut reg,
    );
    let west = seen(&ce, "west").await;
    assert!(west.bundle_trusted && !west.trusts_us, "{west:?}");
    // Give a wrong answer time to show.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let catalog = ce.catalog().borrow().clone().unwrap();
    assert!(catalog.imports(&svc()).is_empty());
    assert!(catalog.peer(&w.name).is_none());

    // west joins east (restarts with the pin): east routes there, and not
    // before west's gateways are given east's bundle.
    cw.shutdown().await;
    let cw2 = Controller::start(
        store.clone(),
        settings(&w, &[&e, &w], 2000),
        vec![echo(&w, true)],
        &mut reg,
    );
    let west_bundles = cw2.bundles();
    let east_td = e.ca.trust_domain().clone();
    let mut rx = ce.catalog();
    let limit = Instant::now() + Duration::from_secs(5);
    loop {
        let names_west = rx
            .borrow_and_update()
            .as_deref()
            .is_some_and(|c| c.peer(&w.name).is_some());
        if names_west {
            assert!(
                west_bundles.borrow().get(&east_td).is_some(),
                "east routes to west before west's gateways trust east"
            );
            break;
        }
        let left = limit
            .checked_duration_since(Instant::now())
            .expect("east never routed to west");
        let _ = tokio::time::timeout(left, rx.changed()).await;
    }
    until(&ce, "west imported", Duration::from_secs(5), |c| {
        c.imports(&svc()) == [w.name.clone()]
    })
    .await;
    let west = ce
        .status()
        .clusters
        .into_iter()
        .find(|c| c.cluster == "west");
    assert!(west.is_some_and(|w| w.trusts_us));
}
