//! Sidecar behaviour: connect-level failover, who the caller is, and who
//! may connect at all.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::Arc;
use std::time::Duration;

use fedmesh_catalog::EndpointSpec;
use fedmesh_testkit::{run_load, LoadSpec, Rig, Topology};
use fedmesh_trust::{PeerPolicy, SpiffeId};
use fedmesh_wire::io::{read_status, write_header};
use fedmesh_wire::{Header, ServiceName, StatusCode, Target};

fn spec(n: usize) -> LoadSpec {
    LoadSpec {
        connections: n,
        requests_per_connection: 5,
        ..LoadSpec::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dead_endpoint_is_skipped_before_any_payload() {
    let rig = Rig::start(&Topology::demo()).await.unwrap();
    let east = rig.cluster("east").unwrap();
    // A port that refuses connections, listed first for hello.demo.
    let dead = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap()
    };
    let mut spec_c = east.catalog_spec().clone();
    let svc = spec_c
        .services
        .iter_mut()
        .find(|s| s.name == "hello.demo")
        .unwrap();
    svc.endpoints.insert(
        0,
        EndpointSpec {
            address: dead,
            identity: Some("spiffe://east.demo/ns/demo/sa/hello".into()),
        },
    );
    east.client.set_catalog(spec_c.build().unwrap());
    let r = run_load(east.client_addr("hello.demo").unwrap(), &spec(12)).await;
    assert_eq!(r.failed, 0, "{:?}", r.errors);
    assert_eq!(r.ok, 60);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn endpoint_with_the_wrong_identity_is_skipped() {
    let rig = Rig::start(&Topology::demo()).await.unwrap();
    let east = rig.cluster("east").unwrap();
    // Expect an identity the real endpoints do not have: every local hop
    // fails the identity check and nothing reaches the app.
    let mut spec_c = east.catalog_spec().clone();
    for e in &mut spec_c
        .services
        .iter_mut()
        .find(|s| s.name == "hello.demo")
        .unwrap()
        .endpoints
    {
        e.identity = Some("spiffe://east.demo/ns/demo/sa/impostor".into());
    }
    east.client.set_catalog(spec_c.build().unwrap());
    let r = run_load(east.client_addr("hello.demo").unwrap(), &spec(3)).await;
    assert_eq!(r.ok, 0);
    assert_eq!(r.failed, 15);
    let seen: u64 = east
        .sidecars
        .iter()
        .flat_map(|s| s.1.metrics().seen())
        .map(|s| s.connections)
        .sum();
    assert_eq!(
        seen, 0,
        "a connection reached an endpoint with the wrong identity"
    );
}

async fn raw_inbound(
    rig: &Rig,
    cluster: &str,
    caller: &SpiffeId,
    header: &Header,
) -> Result<StatusCode, String> {
    let c = rig.cluster(cluster).unwrap();
    let issuer = rig
        .cluster(caller.trust_domain_name().split('.').next().unwrap())
        .unwrap();
    let svid = issuer.ca.issue(caller, Duration::from_secs(600)).unwrap();
    let cfg = fedmesh_trust::client_config(
        &svid,
        c.bundles.clone(),
        PeerPolicy::AnyTrusted,
        &[fedmesh_wire::ALPN],
    )
    .unwrap();
    let addr = c.sidecars[0].1.inbound_addr().unwrap();
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let name = rustls::pki_types::ServerName::try_from("fedmesh.invalid").unwrap();
    let mut tls = tokio_rustls::TlsConnector::from(Arc::new(cfg))
        .connect(name, tcp)
        .await
        .map_err(|e| e.to_string())?;
    write_header(&mut tls, header, &fedmesh_wire::Limits::default())
        .await
        .map_err(|e| e.to_string())?;
    read_status(&mut tls)
        .await
        .map(|s| s.code)
        .map_err(|e| e.to_string())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_the_own_gateway_may_relay_a_source_identity() {
    let rig = Rig::start(&Topology::demo()).await.unwrap();
    let west = rig.cluster("west").unwrap();
    let mut h = Header::new(Target::Service {
        name: ServiceName::new("echo", "demo").unwrap(),
        port: 7000,
    });
    h.source = Some("spiffe://east.demo/ns/demo/sa/admin".into());
    // A west workload claims to relay an east admin: the claim is ignored,
    // the caller is the workload itself.
    let workload = SpiffeId::new("spiffe://west.demo/ns/demo/sa/batch").unwrap();
    assert_eq!(
        raw_inbound(&rig, "west", &workload, &h).await,
        Ok(StatusCode::Ok)
    );
    let seen = west.sidecars[0].1.metrics().seen();
    assert_eq!(seen.len(), 1);
    assert_eq!(seen[0].source, workload.as_str());
    assert_eq!(seen[0].via, "direct");

    // An east workload may not connect to a west sidecar at all.
    let foreign = SpiffeId::new("spiffe://east.demo/ns/demo/sa/client").unwrap();
    assert!(raw_inbound(&rig, "west", &foreign, &h).await.is_err());
    assert_eq!(
        west.sidecars[0]
            .1
            .metrics()
            .rejected_count("handshake_failed"),
        1
    );

    // A service this sidecar does not serve.
    let other = Header::new(Target::Service {
        name: ServiceName::new("other", "demo").unwrap(),
        port: 7000,
    });
    assert_eq!(
        raw_inbound(&rig, "west", &workload, &other).await,
        Ok(StatusCode::UnknownService)
    );
}
