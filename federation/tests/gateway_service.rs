//! The gateway's LoadBalancer Service as the controller follows it: the
//! load balancer's IPs with the Service's `quic` and `tls-fallback` ports,
//! nothing while it has no IP, hostnames skipped, changes followed.
#![cfg(feature = "kube")]
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use fedmesh_federation::k8s::watch_gateway_service;
use fedmesh_federation::Gateways;
use fedmesh_testkit::fake_kube::FakeKube;
use serde_json::json;

const SERVICES: &str = "/api/v1/services";

fn gateway_service(ns: &str, ingress: serde_json::Value) -> serde_json::Value {
    json!({
        "apiVersion": "v1", "kind": "Service",
        "metadata": { "name": "fedmesh-gateway", "namespace": ns },
        "spec": { "type": "LoadBalancer", "ports": [
            { "name": "quic", "port": 15443, "protocol": "UDP" },
            { "name": "tls-fallback", "port": 15444, "protocol": "TCP" },
        ] },
        "status": { "loadBalancer": { "ingress": ingress } },
    })
}

async fn next(rx: &mut tokio::sync::watch::Receiver<Gateways>) -> Gateways {
    tokio::time::timeout(Duration::from_secs(10), rx.changed())
        .await
        .expect("a change within 10 s")
        .unwrap();
    rx.borrow_and_update().clone()
}

#[tokio::test]
async fn the_load_balancer_address_is_followed() {
    let fake = FakeKube::start().await.unwrap();
    let client = kube::Client::try_from(kube::Config::new(fake.url().parse().unwrap())).unwrap();
    // Pending: no IP yet. Another namespace's Service of the same name is
    // not ours.
    fake.put(SERVICES, gateway_service("fedmesh-system", json!([])));
    fake.put(
        SERVICES,
        gateway_service("other", json!([{ "ip": "198.51.100.1" }])),
    );
    let (mut rx, _task) = watch_gateway_service(client, "fedmesh-system", "fedmesh-gateway");
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(*rx.borrow_and_update(), Gateways::default());
    // The cloud assigns an IP (and a hostname-only entry, skipped).
    fake.put(
        SERVICES,
        gateway_service(
            "fedmesh-system",
            json!([{ "ip": "203.0.113.7" }, { "hostname": "lb.example.net" }]),
        ),
    );
    let g = next(&mut rx).await;
    assert_eq!(g.quic, vec!["203.0.113.7:15443".parse().unwrap()]);
    assert_eq!(g.tcp, vec!["203.0.113.7:15444".parse().unwrap()]);
    // It changes: followed.
    fake.put(
        SERVICES,
        gateway_service("fedmesh-system", json!([{ "ip": "203.0.113.9" }])),
    );
    let g = next(&mut rx).await;
    assert_eq!(g.quic, vec!["203.0.113.9:15443".parse().unwrap()]);
}
