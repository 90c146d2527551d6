//! A tunneled connection cut in the middle reaches the application at the
//! other end as a reset (RST), never as a clean end of stream: across
//! clusters over QUIC (pooled legs inside the clusters) and over the TCP
//! fallback, and between the sidecars of one cluster, in both directions.
//! A clean close still arrives as a clean close.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use common::{
    app_cut_reaches_client, client_cut_reaches_app, ended, ends_topology, expect_reset, hold, LIMIT,
};
use fedmesh_testkit::faults::RelayMode;
use fedmesh_testkit::{Rig, Topology};

fn topology() -> Topology {
    ends_topology(Default::default())
}

/// The two paths to `ends.demo`: from east (sidecar → gateway ═QUIC═
/// gateway → sidecar) and from west (sidecar → sidecar).
fn paths(rig: &Rig) -> [(&'static str, SocketAddr); 2] {
    let east = rig.cluster("east").unwrap();
    let west = rig.cluster("west").unwrap();
    [
        ("cross-cluster", east.client_addr("ends.demo").unwrap()),
        ("local", west.client_addr("ends.demo").unwrap()),
    ]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_reset_reaches_the_far_app_as_a_reset() {
    let rig = Rig::start(&topology()).await.unwrap();
    for (path, addr) in paths(&rig) {
        client_cut_reaches_app(addr, path).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_app_reset_reaches_the_client_as_a_reset() {
    let rig = Rig::start(&topology()).await.unwrap();
    for (path, addr) in paths(&rig) {
        app_cut_reaches_client(addr, path).await;
    }
}

/// The QUIC connection between the gateways dies (every packet dropped)
/// under a held stream: the client and the far app both see a reset.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lost_peer_connection_reaches_both_ends_as_a_reset() {
    let rig = Rig::start(&Topology {
        fault_relays: true,
        tcp_fallback: false,
        ..topology()
    })
    .await
    .unwrap();
    let [(_, cross), (_, local)] = paths(&rig);
    let mut s = hold(cross, "lost").await;
    let west = rig.cluster("west").unwrap();
    west.relay.as_ref().unwrap().set(RelayMode::Blackhole);
    expect_reset(&mut s, "the lost peer connection").await;
    west.relay.as_ref().unwrap().set(RelayMode::Pass);
    // West's gateway lost the connection too and cut its side.
    assert_eq!(ended(local, "lost").await, "reset");
}

/// The same cuts over the TCP fallback: UDP to west's gateway is dropped,
/// so east reaches it over TLS + HTTP/2, where a cut is an `RST_STREAM`
/// with `CONNECT_ERROR`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cuts_cross_the_tcp_fallback_as_resets() {
    let rig = Rig::start(&Topology {
        fault_relays: true,
        tcp_fallback: true,
        ..topology()
    })
    .await
    .unwrap();
    let east = rig.cluster("east").unwrap();
    let west = rig.cluster("west").unwrap();
    let [(_, cross), _] = paths(&rig);
    hold(cross, "warm").await; // east has dialed west over QUIC
    west.relay.as_ref().unwrap().set(RelayMode::Blackhole);
    let on_tcp = || {
        east.gateway
            .peer_status()
            .iter()
            .any(|p| p.cluster == "west" && p.transport == "tcp")
    };
    let t0 = Instant::now();
    while !on_tcp() {
        assert!(t0.elapsed() < LIMIT, "east never fell back to TCP");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    client_cut_reaches_app(cross, "tcp").await;
    app_cut_reaches_client(cross, "tcp").await;
    assert!(on_tcp(), "these were the fallback's streams");
}
