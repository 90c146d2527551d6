//! A tunneled connection cut in the middle reaches the application at the
//! other end as a reset (RST), never as a clean end of stream: across
//! clusters over QUIC and between the sidecars of one cluster, in both
//! directions. A clean close still arrives as a clean close.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use fedmesh_testkit::{AppKind, ClusterTopo, Rig, ServiceTopo, Topology};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;

fn topology() -> Topology {
    Topology {
        clusters: vec![
            ClusterTopo {
                name: "east".into(),
                services: vec![],
            },
            ClusterTopo {
                name: "west".into(),
                services: vec![ServiceTopo {
                    name: "ends.demo".into(),
                    port: 7000,
                    replicas: 1,
                    export: true,
                    app: AppKind::Ends,
                }],
            },
        ],
        ..Topology::demo()
    }
}

const LIMIT: Duration = Duration::from_secs(10);

async fn line(s: &mut BufReader<TcpStream>) -> String {
    let mut l = String::new();
    tokio::time::timeout(LIMIT, s.read_line(&mut l))
        .await
        .expect("no line in time")
        .expect("read a line");
    l.trim_end().to_owned()
}

/// A connection through `addr` holding `id` open, checked end to end.
async fn hold(addr: SocketAddr, id: &str) -> BufReader<TcpStream> {
    let mut s = BufReader::new(TcpStream::connect(addr).await.unwrap());
    s.get_mut()
        .write_all(format!("hold {id}\nping\n").as_bytes())
        .await
        .unwrap();
    assert_eq!(line(&mut s).await, "ping");
    s
}

/// How the app saw `id` end, once it has (bounded).
async fn ended(addr: SocketAddr, id: &str) -> String {
    let t0 = Instant::now();
    loop {
        let mut s = BufReader::new(TcpStream::connect(addr).await.unwrap());
        s.get_mut()
            .write_all(format!("ended {id}\n").as_bytes())
            .await
            .unwrap();
        let how = line(&mut s).await;
        if how != "open" {
            return how;
        }
        assert!(t0.elapsed() < LIMIT, "{id} still open after {LIMIT:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The two paths to `ends.demo`: from east (sidecar → gateway ═QUIC═
/// gateway → sidecar) and from west (sidecar → sidecar).
async fn paths(rig: &Rig) -> [(&'static str, SocketAddr); 2] {
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
    for (path, addr) in paths(&rig).await {
        let cut = hold(addr, &format!("{path}-cut")).await;
        cut.get_ref().set_zero_linger().unwrap();
        drop(cut);
        assert_eq!(ended(addr, &format!("{path}-cut")).await, "reset", "{path}");

        // The control: a clean close stays a clean close.
        let mut clean = hold(addr, &format!("{path}-clean")).await;
        clean.get_mut().shutdown().await.unwrap();
        let mut rest = Vec::new();
        tokio::time::timeout(LIMIT, clean.read_to_end(&mut rest))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(ended(addr, &format!("{path}-clean")).await, "fin", "{path}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_app_reset_reaches_the_client_as_a_reset() {
    let rig = Rig::start(&topology()).await.unwrap();
    for (path, addr) in paths(&rig).await {
        let mut s = BufReader::new(TcpStream::connect(addr).await.unwrap());
        s.get_mut().write_all(b"cut\n").await.unwrap();
        assert_eq!(line(&mut s).await, "ok", "{path}");
        s.get_mut().write_all(b"x").await.unwrap();
        let mut buf = [0u8; 16];
        let r = tokio::time::timeout(LIMIT, s.read(&mut buf)).await.unwrap();
        match r {
            Err(e) => assert_eq!(e.kind(), std::io::ErrorKind::ConnectionReset, "{path}: {e}"),
            Ok(n) => panic!("{path}: the app's reset arrived as {n} bytes and a clean end"),
        }
    }
}

/// The QUIC connection between the gateways dies (every packet dropped)
/// under a held stream: the client and the far app both see a reset.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lost_peer_connection_reaches_both_ends_as_a_reset() {
    use fedmesh_testkit::faults::RelayMode;
    let rig = Rig::start(&Topology {
        fault_relays: true,
        tcp_fallback: false,
        ..topology()
    })
    .await
    .unwrap();
    let [(_, cross), (_, local)] = paths(&rig).await;
    let mut s = hold(cross, "lost").await;
    let west = rig.cluster("west").unwrap();
    west.relay.as_ref().unwrap().set(RelayMode::Blackhole);
    let mut buf = [0u8; 16];
    let r = tokio::time::timeout(LIMIT, s.read(&mut buf)).await;
    west.relay.as_ref().unwrap().set(RelayMode::Pass);
    match r.expect("the lost connection was never noticed") {
        Err(e) => assert_eq!(e.kind(), std::io::ErrorKind::ConnectionReset, "{e}"),
        Ok(n) => panic!("the lost connection arrived as {n} bytes and a clean end"),
    }
    // West's gateway lost the connection too and cut its side.
    assert_eq!(ended(local, "lost").await, "reset");
}

/// The same cuts over the TCP fallback: UDP to west's gateway is dropped,
/// so east reaches it over TLS + HTTP/2, where a cut is an `RST_STREAM`
/// with `CONNECT_ERROR`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cuts_cross_the_tcp_fallback_as_resets() {
    use fedmesh_testkit::faults::RelayMode;
    let rig = Rig::start(&Topology {
        fault_relays: true,
        tcp_fallback: true,
        ..topology()
    })
    .await
    .unwrap();
    let east = rig.cluster("east").unwrap();
    let west = rig.cluster("west").unwrap();
    let [(_, cross), _] = paths(&rig).await;
    hold(cross, "warm").await; // east has dialed west over QUIC
    west.relay.as_ref().unwrap().set(RelayMode::Blackhole);
    let t0 = Instant::now();
    while !east
        .gateway
        .peer_status()
        .iter()
        .any(|p| p.cluster == "west" && p.transport == "tcp")
    {
        assert!(t0.elapsed() < LIMIT, "east never fell back to TCP");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    // Client reset → the app sees a reset; a clean close stays clean.
    let cut = hold(cross, "tcp-cut").await;
    cut.get_ref().set_zero_linger().unwrap();
    drop(cut);
    assert_eq!(ended(cross, "tcp-cut").await, "reset");
    let mut clean = hold(cross, "tcp-clean").await;
    clean.get_mut().shutdown().await.unwrap();
    let mut rest = Vec::new();
    tokio::time::timeout(LIMIT, clean.read_to_end(&mut rest))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(ended(cross, "tcp-clean").await, "fin");

    // App reset → the client sees a reset.
    let mut s = BufReader::new(TcpStream::connect(cross).await.unwrap());
    s.get_mut().write_all(b"cut\n").await.unwrap();
    assert_eq!(line(&mut s).await, "ok");
    s.get_mut().write_all(b"x").await.unwrap();
    let mut buf = [0u8; 16];
    match tokio::time::timeout(LIMIT, s.read(&mut buf)).await.unwrap() {
        Err(e) => assert_eq!(e.kind(), std::io::ErrorKind::ConnectionReset, "{e}"),
        Ok(n) => panic!("the app's reset arrived as {n} bytes and a clean end"),
    }
    // Still on the fallback: these were its streams.
    assert!(east
        .gateway
        .peer_status()
        .iter()
        .any(|p| p.cluster == "west" && p.transport == "tcp"));
}
