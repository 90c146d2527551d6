//! The whole data path on loopback: app → sidecar → gateway ═QUIC═ gateway
//! → sidecar → app, with mTLS and SPIFFE identities on every hop.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use fedmesh_testkit::{run_load, LoadSpec, Rig, Topology};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cross_cluster_and_local_traffic_is_byte_exact() {
    let rig = Rig::start(&Topology::demo()).await.unwrap();
    let east = rig.cluster("east").unwrap();
    let spec = LoadSpec {
        connections: 16,
        requests_per_connection: 10,
        request_bytes: 4096,
        ..LoadSpec::default()
    };
    let remote = run_load(east.client_addr("echo.demo").unwrap(), &spec).await;
    assert_eq!(remote.failed, 0, "{:?}", remote.errors);
    assert_eq!(remote.ok, 160);
    // Both exporting clusters served.
    let clusters: std::collections::BTreeSet<_> = remote
        .served_by
        .keys()
        .map(|k| k.split('/').next().unwrap().to_owned())
        .collect();
    assert_eq!(clusters.into_iter().collect::<Vec<_>>(), ["north", "west"]);

    let local = run_load(east.client_addr("hello.demo").unwrap(), &spec).await;
    assert_eq!(local.failed, 0, "{:?}", local.errors);
    assert!(local.served_by.keys().all(|k| k.starts_with("east/")));

    // The destination sidecars saw the caller's own identity, relayed by
    // their gateway; the local service saw it directly.
    for name in ["west", "north"] {
        let c = rig.cluster(name).unwrap();
        let seen: Vec<_> = c
            .sidecars
            .iter()
            .flat_map(|s| s.1.metrics().seen())
            .collect();
        assert!(!seen.is_empty());
        for s in seen {
            assert_eq!(s.source, "spiffe://east.demo/ns/demo/sa/client");
            assert_eq!(s.via, "gateway");
        }
    }
    let seen: Vec<_> = east
        .sidecars
        .iter()
        .flat_map(|s| s.1.metrics().seen())
        .collect();
    assert!(seen
        .iter()
        .all(|s| s.via == "direct" && s.source == "spiffe://east.demo/ns/demo/sa/client"));
    // One QUIC connection per peer, reused by all 16 tunneled connections.
    assert_eq!(
        east.gateway.metrics().stream_count("from_sidecar", "ok"),
        16
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_cluster_is_failed_over_at_connect_time() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter("info")
        .with_test_writer()
        .try_init();
    let mut topo = Topology::demo();
    topo.limits.connect_timeout = std::time::Duration::from_millis(300);
    let rig = Rig::start(&topo).await.unwrap();
    let east = rig.cluster("east").unwrap();
    let spec = LoadSpec {
        connections: 8,
        requests_per_connection: 5,
        ..LoadSpec::default()
    };
    // Warm both peer connections, then kill west's gateway.
    let warm = run_load(east.client_addr("echo.demo").unwrap(), &spec).await;
    assert_eq!(warm.failed, 0, "{:?}", warm.errors);
    rig.cluster("west").unwrap().gateway.close();
    let after = run_load(east.client_addr("echo.demo").unwrap(), &spec).await;
    assert_eq!(after.failed, 0, "{:?}", after.errors);
    assert!(
        after.served_by.keys().all(|k| k.starts_with("north/")),
        "{:?}",
        after.served_by
    );
}

/// A gateway with an admin port, east's identity and catalog, following
/// `controller` when given.
async fn admin_gateway(
    east: &fedmesh_testkit::RigCluster,
    controller: Option<fedmesh_api::client::ControllerLink>,
) -> fedmesh_gateway::Gateway {
    let any = "127.0.0.1:0".parse().unwrap();
    let settings = fedmesh_gateway::GatewaySettings {
        catalog: east.gateway.catalog().as_ref().clone(),
        identity: east
            .ca
            .issue(
                &east.trust_domain.system_id("gateway"),
                std::time::Duration::from_secs(60),
            )
            .unwrap(),
        bundles: east.bundles.clone(),
        quic: any,
        tunnel: any,
        tcp_fallback: None,
        admin: Some(any),
        limits: Default::default(),
        congestion: Default::default(),
        controller,
        drills: None,
    };
    let mut reg = prometheus_client::registry::Registry::default();
    fedmesh_gateway::Gateway::build(settings, &mut reg)
        .await
        .unwrap()
}

/// The whole answer of an admin endpoint to `GET path`.
async fn admin_get(admin: std::net::SocketAddr, path: &str) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(admin).await.unwrap();
    s.write_all(format!("GET {path} HTTP/1.1\r\nhost: x\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).await.unwrap();
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_endpoint_serves_metrics() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let rig = Rig::start(&Topology::demo()).await.unwrap();
    let east = rig.cluster("east").unwrap();
    // A gateway with an admin port, sharing east's identity and catalog.
    let gw = admin_gateway(east, None).await;
    let sock = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
    sock.send_to(b"junk", gw.quic_addr()).await.unwrap();
    let admin = gw.admin_addr().unwrap();
    let get = |path: &'static str| admin_get(admin, path);
    for _ in 0..50 {
        if gw.metrics().invalid_datagrams.get() > 0 {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    let m = get("/metrics").await;
    assert!(m.starts_with("HTTP/1.1 200"), "{m}");
    assert!(
        m.contains("fedmesh_gateway_invalid_datagrams_total 1"),
        "{m}"
    );
    assert!(
        m.contains("fedmesh_gateway_peer_ejections_total")
            || m.contains("# TYPE fedmesh_gateway_peer_ejections counter"),
        "{m}"
    );
    assert!(get("/ready").await.starts_with("HTTP/1.1 200"));
    assert!(get("/nope").await.starts_with("HTTP/1.1 404"));
    // The config the gateway runs on, as a spec that builds it again.
    let dump = get("/config_dump").await;
    let body = dump.split("\r\n\r\n").nth(1).unwrap();
    let v: serde_json::Value = serde_json::from_str(body).unwrap();
    assert_eq!(
        v["identity"],
        "spiffe://east.demo/ns/fedmesh-system/sa/gateway"
    );
    let spec: fedmesh_catalog::CatalogSpec = serde_json::from_value(v["catalog"].clone()).unwrap();
    assert_eq!(spec.build().unwrap(), *gw.catalog());
    // Anything but GET is refused.
    let mut s = tokio::net::TcpStream::connect(admin).await.unwrap();
    s.write_all(b"POST /config_dump HTTP/1.1\r\n\r\n")
        .await
        .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).await.unwrap();
    assert!(out.starts_with("HTTP/1.1 405"), "{out}");
    // Faults are the drill API's (mTLS, operators only), never this port's.
    let mut s = tokio::net::TcpStream::connect(admin).await.unwrap();
    s.write_all(b"PUT /faults/d1 HTTP/1.1\r\ncontent-length: 0\r\n\r\n")
        .await
        .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).await.unwrap();
    assert!(out.starts_with("HTTP/1.1 405"), "{out}");
    // Draining: not ready, so a load balancer stops sending new work.
    gw.set_draining(true);
    assert!(get("/ready").await.starts_with("HTTP/1.1 503"));
    gw.set_draining(false);
    assert!(get("/ready").await.starts_with("HTTP/1.1 200"));

    // A gateway that follows a controller is not ready before its first
    // config; then it reports the version it applied.
    let gw2 = admin_gateway(
        east,
        Some(fedmesh_api::client::ControllerLink {
            address: "127.0.0.1:9".parse().unwrap(),
            cluster: "east".into(),
            renew: false,
        }),
    )
    .await;
    let admin2 = gw2.admin_addr().unwrap();
    let get2 = |path: &'static str| admin_get(admin2, path);
    assert!(get2("/ready").await.starts_with("HTTP/1.1 503"));
    gw2.set_config(east.gateway.catalog().as_ref().clone(), Some(42));
    assert!(gw2.is_ready());
    assert!(get2("/ready").await.starts_with("HTTP/1.1 200"));
    let m = get2("/metrics").await;
    assert!(m.contains("fedmesh_gateway_config_version 42"), "{m}");
    assert!(m.contains("fedmesh_gateway_config_updates_total 1"), "{m}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn controllers_drive_the_data_path_and_proxies_survive_their_loss() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter("warn,fedmesh_gateway=info")
        .with_test_writer()
        .try_init();
    let mut topo = Topology::demo();
    topo.control_plane = fedmesh_testkit::ControlPlane::Embedded;
    let mut rig = Rig::start(&topo).await.unwrap();
    assert!(rig.converged_in.is_some());
    let spec = LoadSpec {
        connections: 8,
        requests_per_connection: 5,
        ..LoadSpec::default()
    };
    let addr = rig
        .cluster("east")
        .unwrap()
        .client_addr("echo.demo")
        .unwrap();
    let r = run_load(addr, &spec).await;
    assert_eq!(r.failed, 0, "{:?}", r.errors);
    assert!(
        r.served_by.keys().any(|k| k.starts_with("west/"))
            && r.served_by.keys().any(|k| k.starts_with("north/"))
    );
    // Static stability: every controller (and the store) gone, proxies
    // keep serving with the last config they have.
    for c in &mut rig.clusters {
        c.controller = None;
    }
    rig.store = None;
    let r = run_load(addr, &spec).await;
    assert_eq!(r.failed, 0, "{:?}", r.errors);
}

/// `east` exports `hello.demo`, `west` exports `echo.demo`: each calls the
/// other.
fn pair_topology() -> Topology {
    use fedmesh_testkit::{AppKind, ClusterTopo, ServiceTopo};
    let svc = |name: &str| ServiceTopo {
        name: name.into(),
        port: 7000,
        replicas: 1,
        export: true,
        audience: None,
        app: AppKind::Echo,
    };
    Topology {
        clusters: vec![
            ClusterTopo {
                name: "east".into(),
                services: vec![svc("hello.demo")],
            },
            ClusterTopo {
                name: "west".into(),
                services: vec![svc("echo.demo")],
            },
        ],
        ..Topology::demo()
    }
}

/// Two clusters that call each other share one QUIC connection: `east`
/// (the name that sorts first) dials, `west` adopts that connection for
/// its own streams and folds away any connection it dialed meanwhile.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gateway_pair_shares_one_quic_connection() {
    let rig = Rig::start(&pair_topology()).await.unwrap();
    let east = rig.cluster("east").unwrap();
    let west = rig.cluster("west").unwrap();
    let spec = LoadSpec {
        connections: 8,
        requests_per_connection: 4,
        request_bytes: 1024,
        ..LoadSpec::default()
    };
    let both_ways = || async {
        let there = run_load(east.client_addr("echo.demo").unwrap(), &spec).await;
        assert_eq!(there.failed, 0, "{:?}", there.errors);
        assert!(there.served_by.keys().all(|k| k.starts_with("west/")));
        let back = run_load(west.client_addr("hello.demo").unwrap(), &spec).await;
        assert_eq!(back.failed, 0, "{:?}", back.errors);
        assert!(back.served_by.keys().all(|k| k.starts_with("east/")));
    };
    both_ways().await;
    // A connection west dialed before east's arrived closes once its
    // streams are done (plus a short linger).
    until("one QUIC connection each", || {
        (
            east.gateway.quic_connections(),
            west.gateway.quic_connections(),
        ) == (1, 1)
    })
    .await;
    both_ways().await;
    assert_eq!(east.gateway.quic_connections(), 1);
    assert_eq!(west.gateway.quic_connections(), 1);
    // Both directions ran over it: each side served the other's streams.
    assert!(east.gateway.metrics().stream_count("from_peer", "ok") >= 16);
    assert!(west.gateway.metrics().stream_count("from_peer", "ok") >= 16);
}

/// The fold path: when `east`'s dial cannot reach `west`, west dials east
/// itself; once east's dial gets through again, west moves new streams to
/// it but keeps its own connection until the stream it carries ends.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_folded_connection_closes_only_after_its_streams_end() {
    use std::time::Duration;

    use fedmesh_testkit::faults::RelayMode;
    use tokio::io::AsyncBufReadExt;
    use tokio::time::Instant;

    let _ = tracing_subscriber::fmt()
        .with_env_filter(std::env::var("RUST_LOG").unwrap_or_else(|_| "warn".into()))
        .with_test_writer()
        .try_init();
    let mut topo = pair_topology();
    topo.fault_relays = true;
    topo.limits.connect_timeout = Duration::from_millis(500);
    let rig = Rig::start(&topo).await.unwrap();
    let east = rig.cluster("east").unwrap();
    let west = rig.cluster("west").unwrap();
    let quic = || {
        (
            east.gateway.quic_connections(),
            west.gateway.quic_connections(),
        )
    };
    until("the pair settles on east's dial", || quic() == (1, 1)).await;

    // Packets to west's QUIC port vanish: the pair's connection goes
    // silent, east's redials cannot reach west, and west dials east.
    west.relay.as_ref().unwrap().set(RelayMode::Blackhole);
    let spec = LoadSpec {
        connections: 2,
        requests_per_connection: 2,
        request_bytes: 256,
        ..LoadSpec::default()
    };
    let hello = west.client_addr("hello.demo").unwrap();
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let r = run_load(hello, &spec).await;
        if r.failed == 0 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "west never reached east: {:?}",
            r.errors
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // A long-lived tunneled connection on west's own dial.
    let mut held = tokio::io::BufReader::new(tokio::net::TcpStream::connect(hello).await.unwrap());
    let mut banner = String::new();
    held.read_line(&mut banner).await.unwrap();
    assert!(banner.starts_with("east/"), "{banner}");
    echo(&mut held, b"before the fold").await;

    // East's dial gets through again: west adopts it and holds two
    // connections while the held stream lives on the old one.
    west.relay.as_ref().unwrap().set(RelayMode::Pass);
    let dialed_by = || {
        west.gateway
            .peer_status()
            .into_iter()
            .find(|p| p.cluster == "east")
            .and_then(|p| p.dialed_by)
    };
    assert_eq!(dialed_by(), Some("us"));
    until("west adopts east's dial", || dialed_by() == Some("peer")).await;
    let r = run_load(hello, &spec).await;
    assert_eq!(r.failed, 0, "{:?}", r.errors);
    // East's dials abandoned during the blackhole may still be closing
    // (3 PTOs of an unmeasured path, about 3 s); then west holds exactly
    // its own dial and the adopted one.
    until("abandoned handshakes drained", || {
        west.gateway.quic_connections() == 2
    })
    .await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(
        west.gateway.quic_connections(),
        2,
        "folded before its stream ended"
    );
    echo(&mut held, b"after the fold").await;

    drop(held);
    until("west closes its folded dial", || quic() == (1, 1)).await;
    let r = run_load(hello, &spec).await;
    assert_eq!(r.failed, 0, "{:?}", r.errors);
    let r = run_load(east.client_addr("echo.demo").unwrap(), &spec).await;
    assert_eq!(r.failed, 0, "{:?}", r.errors);
}

/// Waits (bounded) until `ok` holds.
async fn until(what: &str, ok: impl Fn() -> bool) {
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(15);
    while !ok() {
        assert!(tokio::time::Instant::now() < deadline, "timed out: {what}");
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
}

/// Writes `msg` on an echo connection and checks it comes back.
async fn echo(held: &mut tokio::io::BufReader<tokio::net::TcpStream>, msg: &[u8]) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    held.get_mut().write_all(msg).await.unwrap();
    let mut back = vec![0; msg.len()];
    held.read_exact(&mut back).await.unwrap();
    assert_eq!(back, msg);
}

/// Payload crosses the QUIC leg in both directions byte for byte (chunks
/// spliced without a buffer copy), and a half-close is passed on: the sink
/// answers its count only after our shutdown reached it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn large_payloads_cross_byte_exact_and_half_closes_pass() {
    use fedmesh_testkit::{AppKind, ClusterTopo, ServiceTopo};
    use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt};
    let svc = |name: &str, app| ServiceTopo {
        name: name.into(),
        port: 7000,
        replicas: 1,
        export: true,
        audience: None,
        app,
    };
    let topo = Topology {
        clusters: vec![
            ClusterTopo {
                name: "east".into(),
                services: vec![],
            },
            ClusterTopo {
                name: "west".into(),
                services: vec![
                    svc("echo.demo", AppKind::Echo),
                    svc("sink.demo", AppKind::Sink),
                ],
            },
        ],
        ..Topology::demo()
    };
    let rig = Rig::start(&topo).await.unwrap();
    let east = rig.cluster("east").unwrap();

    // Pseudo-random bytes, so a dropped, duplicated or reordered chunk shows.
    let mut x = 0x9e37_79b9_7f4a_7c15u64;
    let data: Vec<u8> = (0..(4 << 20))
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect();

    let echo = tokio::net::TcpStream::connect(east.client_addr("echo.demo").unwrap())
        .await
        .unwrap();
    let (rd, mut wr) = echo.into_split();
    let mut rd = tokio::io::BufReader::new(rd);
    let mut banner = String::new();
    rd.read_line(&mut banner).await.unwrap();
    assert!(banner.starts_with("west/"), "{banner}");
    let sent = data.clone();
    let writer = tokio::spawn(async move {
        for piece in sent.chunks(100_003) {
            wr.write_all(piece).await.unwrap();
        }
        wr.shutdown().await.unwrap();
    });
    let mut back = Vec::new();
    tokio::time::timeout(
        std::time::Duration::from_secs(30),
        rd.read_to_end(&mut back),
    )
    .await
    .expect("echo ended after our half-close")
    .unwrap();
    writer.await.unwrap();
    assert!(
        back == data,
        "echo differs: {} of {} bytes back",
        back.len(),
        data.len()
    );
    // Path MTU discovery climbed past Ethernet's 1,472 bytes on loopback
    // (it stopped there while the endpoints told each other they accept
    // no more), and no jumbo batch vanished on the way (black holes).
    until("the QUIC path MTU past 1,472 bytes", || {
        east.gateway.metrics().path_mtu("west") > 1472
    })
    .await;
    assert_eq!(east.gateway.metrics().black_hole_count("west"), 0);

    let mut sink = tokio::net::TcpStream::connect(east.client_addr("sink.demo").unwrap())
        .await
        .unwrap();
    sink.write_all(&data).await.unwrap();
    sink.shutdown().await.unwrap();
    let mut count = [0u8; 8];
    sink.read_exact(&mut count).await.unwrap();
    assert_eq!(u64::from_be_bytes(count), data.len() as u64);
}
