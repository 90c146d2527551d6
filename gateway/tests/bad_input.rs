//! Every kind of bad input the gateway must answer: a specific status or
//! close, a counter, and neighbours that keep working.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::Arc;
use std::time::Duration;

use fedmesh_gateway::quic_client_config;
use fedmesh_testkit::{run_load, ControlPlane, LoadSpec, Rig, RigCluster, Topology};
use fedmesh_transport::Limits;
use fedmesh_trust::{CertificateAuthority, SpiffeId, Svid, TrustDomain};
use fedmesh_wire::io::read_status;
use fedmesh_wire::{Header, ServiceName, StatusCode, Target, MAX_HOPS};
use tokio::io::AsyncWriteExt;

fn limits() -> Limits {
    Limits {
        header_timeout: Duration::from_millis(400),
        max_streams_per_connection: 4,
        ..Limits::default()
    }
}

async fn rig() -> Rig {
    let mut t = Topology::demo();
    t.limits = limits();
    Rig::start(&t).await.unwrap()
}

fn echo(port: u16) -> Target {
    Target::Service {
        name: ServiceName::new("echo", "demo").unwrap(),
        port,
    }
}

/// A QUIC client to `to`'s gateway presenting `svid`.
async fn quic_client(rig: &Rig, to: &str, svid: &Svid) -> Result<quinn::Connection, String> {
    let to = rig.cluster(to).unwrap();
    let mut ep = quinn::Endpoint::client("127.0.0.1:0".parse().unwrap()).unwrap();
    let svid = fedmesh_trust::SvidSource::new(svid.clone()).unwrap();
    let cfg =
        quic_client_config(&svid, to.bundles.clone(), &limits(), &Default::default()).unwrap();
    ep.set_default_client_config(cfg);
    let conn = ep
        .connect(to.gateway.quic_addr(), "fedmesh.invalid")
        .unwrap()
        .await
        .map_err(|e| e.to_string())?;
    Ok(conn)
}

/// west's real gateway identity, as a fake peer for east.
fn west_gateway(rig: &Rig) -> Svid {
    let west = rig.cluster("west").unwrap();
    west.ca
        .issue(
            &west.trust_domain.system_id("gateway"),
            Duration::from_secs(3600),
        )
        .unwrap()
}

/// Sends raw bytes on a new stream and returns the status code answered.
async fn send_raw(conn: &quinn::Connection, bytes: &[u8]) -> Result<StatusCode, String> {
    let st = send_status(conn, bytes).await?;
    // Whatever the refusal, a peer is told the code's fixed text only.
    if st.code != StatusCode::Ok {
        assert_eq!(st.message, st.code.fixed_message(), "{st}");
    }
    Ok(st.code)
}

async fn send_status(
    conn: &quinn::Connection,
    bytes: &[u8],
) -> Result<fedmesh_wire::Status, String> {
    let (mut s, mut r) = conn.open_bi().await.map_err(|e| e.to_string())?;
    s.write_all(bytes).await.map_err(|e| e.to_string())?;
    tokio::time::timeout(Duration::from_secs(5), read_status(&mut r))
        .await
        .map_err(|_| "no status".to_string())?
        .map_err(|e| e.to_string())
}

fn header(target: Target, source: Option<&str>, hops: u8) -> Vec<u8> {
    let mut h = Header::new(target);
    h.source = source.map(str::to_owned);
    h.hops = hops;
    h.to_bytes(&fedmesh_wire::Limits::default()).unwrap()
}

/// Neighbours keep working: a normal cross-cluster load from east succeeds.
async fn neighbours_ok(east: &RigCluster) {
    let spec = LoadSpec {
        connections: 4,
        requests_per_connection: 5,
        ..LoadSpec::default()
    };
    let r = run_load(east.client_addr("echo.demo").unwrap(), &spec).await;
    assert_eq!(r.failed, 0, "{:?}", r.errors);
}

const CLIENT: &str = "spiffe://west.demo/ns/demo/sa/client";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn headers_are_checked_and_answered() {
    let rig = rig().await;
    let east = rig.cluster("east").unwrap();
    // Pose as west's gateway towards north, which exports echo.demo. Not
    // the other way round: west adopts the connection north dials, so a
    // second "north" connection would take the real one's place and be
    // folded away when the real north dials again.
    let north = rig.cluster("north").unwrap();
    let conn = quic_client(&rig, "north", &west_gateway(&rig))
        .await
        .unwrap();
    let m = north.gateway.metrics();
    let west_src = "spiffe://west.demo/ns/demo/sa/client";
    // A workload of another cluster: west may not vouch for it.
    let east_client = "spiffe://east.demo/ns/demo/sa/client";

    // A good header first: the real echo answers.
    assert_eq!(
        send_raw(&conn, &header(echo(7000), Some(west_src), 1)).await,
        Ok(StatusCode::Ok)
    );

    // Malformed: not a header at all.
    assert_eq!(
        send_raw(&conn, b"GET / HTTP/1.1\r\n\r\n").await,
        Ok(StatusCode::BadHeader)
    );
    // Oversized: the prefix claims 60000 bytes (limit 16 KiB).
    assert_eq!(
        send_raw(&conn, &[b'F', b'M', b'T', b'H', 1, 0, 0xea, 0x60]).await,
        Ok(StatusCode::BadHeader)
    );
    // Truncated: half a header, then the stream is finished.
    let good = header(echo(7000), Some(west_src), 1);
    let (mut s, mut r) = conn.open_bi().await.unwrap();
    s.write_all(&good[..good.len() / 2]).await.unwrap();
    s.finish().unwrap();
    assert_eq!(
        read_status(&mut r).await.unwrap().code,
        StatusCode::BadHeader
    );
    assert_eq!(m.rejected_count("bad_header"), 3);

    // Unknown service, unknown port, service not exported: a peer cannot
    // tell them apart, and learns no address or name it did not send.
    let unknown = send_status(
        &conn,
        &header(
            Target::Service {
                name: ServiceName::new("nope", "demo").unwrap(),
                port: 7000,
            },
            Some(west_src),
            1,
        ),
    )
    .await
    .unwrap();
    let wrong_port = send_status(&conn, &header(echo(1), Some(west_src), 1))
        .await
        .unwrap();
    assert_eq!(unknown, wrong_port);
    let ep = send_status(
        &conn,
        &header(
            Target::Endpoint("127.0.0.1:1".parse().unwrap()),
            Some(west_src),
            1,
        ),
    )
    .await
    .unwrap();
    for st in [&unknown, &wrong_port, &ep] {
        for secret in ["127.0.0.1", "demo", "echo", "north", "spiffe"] {
            assert!(!st.message.contains(secret), "{st} tells {secret}");
        }
    }
    // Unknown service, unknown port, service not exported.
    let nope = Target::Service {
        name: ServiceName::new("nope", "demo").unwrap(),
        port: 7000,
    };
    assert_eq!(
        send_raw(&conn, &header(nope, Some(west_src), 1)).await,
        Ok(StatusCode::UnknownService)
    );
    assert_eq!(
        send_raw(&conn, &header(echo(1), Some(west_src), 1)).await,
        Ok(StatusCode::UnknownService)
    );
    // An endpoint target that is not an exported endpoint: denied.
    let ep = Target::Endpoint("127.0.0.1:1".parse().unwrap());
    assert_eq!(
        send_raw(&conn, &header(ep, Some(west_src), 1)).await,
        Ok(StatusCode::Denied)
    );

    // Source identity outside the peer's trust domain: west may not vouch
    // for an east (or north's own) workload.
    assert_eq!(
        send_raw(&conn, &header(echo(7000), Some(east_client), 1)).await,
        Ok(StatusCode::Denied)
    );
    assert_eq!(
        send_raw(&conn, &header(echo(7000), Some("spiffe://north.demo/x"), 1)).await,
        Ok(StatusCode::Denied)
    );
    // No source at all.
    assert_eq!(
        send_raw(&conn, &header(echo(7000), None, 1)).await,
        Ok(StatusCode::Denied)
    );
    assert_eq!(m.rejected_count("source_denied"), 3);

    // Hop count at the limit: a loop.
    assert_eq!(
        send_raw(&conn, &header(echo(7000), Some(west_src), MAX_HOPS)).await,
        Ok(StatusCode::Loop)
    );
    assert_eq!(m.rejected_count("loop"), 1);

    // A stream that never sends a header is timed out.
    let (mut s, mut r) = conn.open_bi().await.unwrap();
    s.write_all(b"F").await.unwrap();
    let st = tokio::time::timeout(Duration::from_secs(5), read_status(&mut r))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(st.code, StatusCode::Timeout);
    assert_eq!(m.rejected_count("header_timeout"), 1);

    // The same connection still works after all that.
    assert_eq!(
        send_raw(&conn, &header(echo(7000), Some(west_src), 1)).await,
        Ok(StatusCode::Ok)
    );
    neighbours_ok(east).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stream_flood_is_capped_per_connection() {
    let rig = rig().await;
    let east = rig.cluster("east").unwrap();
    let conn = quic_client(&rig, "east", &west_gateway(&rig))
        .await
        .unwrap();
    // Fill the cap (4) with streams that never finish their header.
    let mut held = Vec::new();
    for _ in 0..4 {
        let (mut s, r) = conn.open_bi().await.unwrap();
        s.write_all(b"FM").await.unwrap();
        held.push((s, r));
    }
    // The fifth waits for credit instead of being served...
    let fifth = tokio::time::timeout(Duration::from_millis(200), conn.open_bi()).await;
    assert!(fifth.is_err(), "a fifth concurrent stream was allowed");
    // ...while other connections are unaffected.
    neighbours_ok(east).await;
    // Once the held streams time out, credit returns and streams flow again.
    for (_, r) in held.iter_mut() {
        let st = read_status(r).await.unwrap();
        assert_eq!(st.code, StatusCode::Timeout);
    }
    drop(held);
    let st = tokio::time::timeout(
        Duration::from_secs(5),
        send_raw(&conn, &header(echo(7000), None, 1)),
    )
    .await
    .expect("stream credit came back");
    // east does not serve echo.demo: the header is read and answered.
    assert_eq!(st, Ok(StatusCode::Denied));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn non_quic_datagrams_are_counted_and_ignored() {
    let rig = rig().await;
    let east = rig.cluster("east").unwrap();
    let sock = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
    for junk in [&b"hello"[..], &[0u8; 1200][..], &[0x00, 0x01, 0x02][..]] {
        sock.send_to(junk, east.gateway.quic_addr()).await.unwrap();
    }
    // Traffic across the same UDP port still flows.
    neighbours_ok(east).await;
    let n = east.gateway.metrics().invalid_datagrams.get();
    assert!(n >= 3, "invalid datagrams counted: {n}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_peer_certificates_are_refused() {
    let rig = rig().await;
    let east = rig.cluster("east").unwrap();
    let m = east.gateway.metrics();
    let ttl = Duration::from_secs(3600);
    let west_td = TrustDomain::new("west.demo").unwrap();

    // 1. A certificate from a CA nobody trusts, claiming west's gateway.
    let rogue = CertificateAuthority::new_root(west_td.clone(), ttl).unwrap();
    let svid = rogue.issue(&west_td.system_id("gateway"), ttl).unwrap();
    // 2. A valid certificate of another trust domain than the one it claims:
    //    north's CA signing a west gateway identity.
    let north = rig.cluster("north").unwrap();
    let params = CertificateAuthority::svid_params(&west_td.system_id("gateway"), ttl).unwrap();
    let (chain, key) = north.ca.issue_custom(&params).unwrap();
    let cross = Svid::new(chain, key).unwrap();

    for (what, svid) in [("untrusted CA", svid), ("cross-domain", cross)] {
        // TLS 1.3: the client may think it connected; the refusal shows at
        // the first stream operation.
        let outcome = match quic_client(&rig, "east", &svid).await {
            Err(e) => Err(e),
            Ok(conn) => send_raw(&conn, &header(echo(7000), None, 1)).await,
        };
        assert!(outcome.is_err(), "{what}: accepted: {outcome:?}");
    }
    assert!(m.rejected_count("handshake_failed") >= 2);

    // 3. A trusted identity that is no peer gateway: handshake completes,
    //    then the connection is closed.
    let workload = rig
        .cluster("west")
        .unwrap()
        .ca
        .issue(&SpiffeId::new(CLIENT).unwrap(), ttl)
        .unwrap();
    let outcome = match quic_client(&rig, "east", &workload).await {
        Err(e) => Err(e),
        Ok(conn) => send_raw(&conn, &header(echo(7000), None, 1)).await,
    };
    assert!(
        outcome.is_err(),
        "non-gateway identity accepted: {outcome:?}"
    );
    assert_eq!(m.rejected_count("unknown_peer"), 1);
    neighbours_ok(east).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tunnel_port_refuses_clients_without_a_valid_certificate() {
    let rig = rig().await;
    let east = rig.cluster("east").unwrap();
    let m = east.gateway.metrics();
    let addr = east.gateway.tunnel_addr();

    // No client certificate at all.
    let cfg = Arc::new(fedmesh_testkit::tls::client_without_certificate());
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let name = rustls::pki_types::ServerName::try_from("fedmesh.invalid").unwrap();
    let tls = tokio_rustls::TlsConnector::from(cfg)
        .connect(name, tcp)
        .await;
    // The handshake may "complete" client-side; the first read shows the refusal.
    if let Ok(mut tls) = tls {
        let _ = tls.write_all(&header(echo(7000), None, 0)).await;
        assert!(read_status(&mut tls).await.is_err());
    }

    // A valid workload of another cluster may not use east's gateway.
    let west = rig.cluster("west").unwrap();
    let foreign = west
        .ca
        .issue(&SpiffeId::new(CLIENT).unwrap(), Duration::from_secs(3600))
        .unwrap();
    let cfg = fedmesh_trust::client_config(
        &foreign,
        east.bundles.clone(),
        fedmesh_trust::PeerPolicy::AnyTrusted,
        &[fedmesh_wire::ALPN],
    )
    .unwrap();
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let name = rustls::pki_types::ServerName::try_from("fedmesh.invalid").unwrap();
    if let Ok(mut tls) = tokio_rustls::TlsConnector::from(Arc::new(cfg))
        .connect(name, tcp)
        .await
    {
        let _ = tls.write_all(&header(echo(7000), None, 0)).await;
        assert!(read_status(&mut tls).await.is_err());
    }
    // Give the server a moment to count both refusals.
    for _ in 0..50 {
        if m.rejected_count("handshake_failed") >= 2 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(m.rejected_count("handshake_failed"), 2);
    neighbours_ok(east).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unreachable_peer_backs_off_instead_of_retrying_every_stream() {
    let mut topo = Topology::demo();
    topo.limits.connect_timeout = Duration::from_millis(300);
    let rig = Rig::start(&topo).await.unwrap();
    let east = rig.cluster("east").unwrap();
    // A peer whose UDP port swallows everything and never answers.
    let silent = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    let mut spec = east.catalog_spec().clone();
    spec.peers.push(fedmesh_catalog::PeerSpec {
        cluster: "south".into(),
        trust_domain: "south.demo".into(),
        gateway: silent.local_addr().unwrap(),
        gateway_tcp: None,
        identity: None,
        region: String::new(),
    });
    spec.imports.push(fedmesh_catalog::ImportSpec {
        service: "ghost.demo".into(),
        clusters: vec!["south".into()],
    });
    east.gateway.set_catalog(spec.build().unwrap());

    let me = east
        .ca
        .issue(
            &SpiffeId::new("spiffe://east.demo/ns/demo/sa/client").unwrap(),
            Duration::from_secs(600),
        )
        .unwrap();
    let cfg = Arc::new(
        fedmesh_trust::client_config(
            &me,
            east.bundles.clone(),
            fedmesh_trust::PeerPolicy::AnyTrusted,
            &[fedmesh_wire::ALPN],
        )
        .unwrap(),
    );
    let ghost = Target::Service {
        name: ServiceName::new("ghost", "demo").unwrap(),
        port: 80,
    };
    let attempt = || {
        let cfg = cfg.clone();
        let ghost = ghost.clone();
        async move {
            let tcp = tokio::net::TcpStream::connect(east.gateway.tunnel_addr())
                .await
                .unwrap();
            let name = rustls::pki_types::ServerName::try_from("fedmesh.invalid").unwrap();
            let mut tls = tokio_rustls::TlsConnector::from(cfg)
                .connect(name, tcp)
                .await
                .unwrap();
            tls.write_all(&header(ghost, None, 0)).await.unwrap();
            let t0 = std::time::Instant::now();
            let st = read_status(&mut tls).await.unwrap();
            (st, t0.elapsed())
        }
    };
    // The first stream waits for the first connect (which the catalog
    // update already started) and learns why it failed.
    let (first, _) = attempt().await;
    assert_eq!(first.code, StatusCode::PeerDown, "{first}");
    assert!(first.message.contains("no answer within"), "{first}");
    // The next streams fail fast: the peer is down and reconnected in the
    // background, not once per stream.
    for _ in 0..3 {
        let (next, took) = attempt().await;
        assert_eq!(next.code, StatusCode::PeerDown);
        assert!(next.message.contains("is down"), "{next}");
        assert!(took < Duration::from_millis(100), "{took:?}");
    }
}

/// Two clusters' controllers learn of each other at slightly different
/// times: a new peer's dial can arrive before the catalog that names it.
/// The gateway holds such a connection (its trust domain is trusted but
/// no peer has it yet) until a catalog names it, then serves it; one that
/// is never named is closed after the handshake timeout and counted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_peer_is_served_once_the_catalog_names_it() {
    let mut t = Topology::demo();
    t.limits = Limits {
        handshake_timeout: Duration::from_secs(1),
        ..limits()
    };
    let rig = Rig::start(&t).await.unwrap();
    let north = rig.cluster("north").unwrap();
    // A new cluster `south`: north already trusts its bundle (its
    // controller accepted it) but its catalog does not name it yet.
    let south_td = TrustDomain::new("south.demo").unwrap();
    let south =
        CertificateAuthority::new_root(south_td.clone(), Duration::from_secs(3600)).unwrap();
    north
        .bundles
        .store((*north.bundles.load()).clone().with(south.bundle()));
    let south_gw = south
        .issue(&south_td.system_id("gateway"), Duration::from_secs(3600))
        .unwrap();
    let m = north.gateway.metrics();

    // Never named: closed once the handshake timeout passed.
    let conn = quic_client(&rig, "north", &south_gw).await.unwrap();
    let t0 = std::time::Instant::now();
    let outcome = send_raw(&conn, &header(echo(7000), None, 1)).await;
    assert!(outcome.is_err(), "served before any catalog named it");
    assert!(
        t0.elapsed() >= Duration::from_millis(900),
        "{:?}",
        t0.elapsed()
    );
    assert_eq!(m.rejected_count("unknown_peer"), 1);

    // Named while the connection waits: served.
    let conn = quic_client(&rig, "north", &south_gw).await.unwrap();
    let from_south = header(echo(7000), Some("spiffe://south.demo/ns/demo/sa/client"), 1);
    let waiting = tokio::spawn(async move { send_raw(&conn, &from_south).await });
    tokio::time::sleep(Duration::from_millis(300)).await;
    let mut spec = north.catalog_spec().clone();
    spec.peers.push(fedmesh_catalog::PeerSpec {
        cluster: "south".into(),
        trust_domain: "south.demo".into(),
        // Nobody listens there: only the accepting side matters here.
        gateway: "127.0.0.1:9".parse().unwrap(),
        gateway_tcp: None,
        identity: None,
        region: String::new(),
    });
    north.gateway.set_catalog(spec.build().unwrap());
    let st = waiting.await.unwrap();
    assert_eq!(st, Ok(StatusCode::Ok));
    assert_eq!(m.rejected_count("unknown_peer"), 1);
    neighbours_ok(rig.cluster("east").unwrap()).await;
}

/// An export's audience is enforced by the gateway that serves it: a peer
/// outside it asking for the service (any port, or one of its endpoints)
/// gets exactly the answer for a service that does not exist, and the
/// refusal is counted against that peer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_service_is_served_only_to_its_audience() {
    served_only_to_its_audience(ControlPlane::Static).await;
}

/// The same with controllers: the audience travels from the export
/// through the store, the catalog and the config API to the gateway.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_audience_from_the_controller_is_enforced_by_the_gateway() {
    served_only_to_its_audience(ControlPlane::Embedded).await;
}

async fn served_only_to_its_audience(control_plane: ControlPlane) {
    let mut t = Topology::demo();
    t.limits = limits();
    t.control_plane = control_plane;
    let north_topo = t.clusters.iter_mut().find(|c| c.name == "north").unwrap();
    let mut private = north_topo.services[0].clone();
    private.name = "private.demo".into();
    private.audience = Some(vec!["east".into()]);
    north_topo.services.push(private);
    let rig = Rig::start(&t).await.unwrap();
    let north = rig.cluster("north").unwrap();
    let m = north.gateway.metrics();

    // east, in the audience, is served through the real mesh.
    let east = rig.cluster("east").unwrap();
    let spec = LoadSpec {
        connections: 2,
        requests_per_connection: 3,
        ..LoadSpec::default()
    };
    let r = run_load(east.client_addr("private.demo").unwrap(), &spec).await;
    assert_eq!(r.failed, 0, "{:?}", r.errors);

    // west's gateway (which does not import it) asks anyway.
    let conn = quic_client(&rig, "north", &west_gateway(&rig))
        .await
        .unwrap();
    let private = |port| Target::Service {
        name: ServiceName::new("private", "demo").unwrap(),
        port,
    };
    let nope = Target::Service {
        name: ServiceName::new("nope", "demo").unwrap(),
        port: 7000,
    };
    let unknown = send_status(&conn, &header(nope, Some(CLIENT), 1))
        .await
        .unwrap();
    assert_eq!(unknown.code, StatusCode::UnknownService);
    for port in [7000, 1] {
        let st = send_status(&conn, &header(private(port), Some(CLIENT), 1))
            .await
            .unwrap();
        assert_eq!(st, unknown, "port {port}");
        for secret in ["private", "127.0.0.1", "east", "north", "audience"] {
            assert!(!st.message.contains(secret), "{st} tells {secret}");
        }
    }
    assert_eq!(m.peer_refused_count("west", "not_in_audience"), 2);
    assert_eq!(m.peer_refused_count("west", "unknown_service"), 1);
    assert_eq!(m.peer_refused_count("east", "not_in_audience"), 0);

    // Its endpoints are closed to west as any address is.
    let catalog = north.gateway.catalog();
    let served = catalog
        .service(&ServiceName::new("private", "demo").unwrap())
        .unwrap();
    assert_eq!(
        served.audience,
        Some(vec![fedmesh_catalog::ClusterName::new("east").unwrap()])
    );
    let private_eps: Vec<_> = served.endpoints.iter().map(|e| e.address).collect();
    assert!(!private_eps.is_empty());
    let nowhere = send_status(
        &conn,
        &header(
            Target::Endpoint("127.0.0.1:1".parse().unwrap()),
            Some(CLIENT),
            1,
        ),
    )
    .await
    .unwrap();
    for ep in private_eps {
        let st = send_status(&conn, &header(Target::Endpoint(ep), Some(CLIENT), 1))
            .await
            .unwrap();
        assert_eq!(st, nowhere, "{ep}");
    }
    // echo.demo, exported to all, still serves west.
    assert_eq!(
        send_raw(&conn, &header(echo(7000), Some(CLIENT), 1)).await,
        Ok(StatusCode::Ok)
    );
    // And east keeps being served.
    let r = run_load(east.client_addr("private.demo").unwrap(), &spec).await;
    assert_eq!(r.failed, 0, "{:?}", r.errors);
}

/// What the log receives of a string a peer chose: a bounded, escaped
/// prefix, whatever the peer sent (a 12,000-byte host name with a terminal
/// escape in it, a 2 KiB source identity it may not vouch for).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn strings_a_peer_chose_are_logged_as_bounded_prefixes() {
    use std::sync::Mutex;
    #[derive(Clone, Default)]
    struct Captured(Arc<Mutex<Vec<u8>>>);
    impl std::io::Write for Captured {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }
    let logs = Captured::default();
    let writer = logs.clone();
    // nextest runs each test in a process of its own: the global
    // subscriber sees this test's gateways only.
    tracing_subscriber::fmt()
        .with_env_filter("debug")
        .with_ansi(false)
        .with_writer(move || writer.clone())
        .try_init()
        .ok();

    let rig = rig().await;
    let conn = quic_client(&rig, "north", &west_gateway(&rig))
        .await
        .unwrap();
    // A service host no decoder accepts: 12,000 bytes, an escape inside.
    let host = format!("{}\u{1b}[2J.demo", "a".repeat(12_000));
    let mut target = vec![1u8];
    target.extend_from_slice(&7000u16.to_be_bytes());
    target.extend_from_slice(host.as_bytes());
    let mut body = vec![0x01];
    body.extend_from_slice(&u16::try_from(target.len()).unwrap().to_be_bytes());
    body.extend_from_slice(&target);
    body.extend_from_slice(&[0x05, 0, 1, 1]);
    let mut frame = b"FMTH\x01\x00".to_vec();
    frame.extend_from_slice(&u16::try_from(body.len()).unwrap().to_be_bytes());
    frame.extend_from_slice(&body);
    let st = send_status(&conn, &frame).await.unwrap();
    assert_eq!(st.code, StatusCode::BadHeader);
    assert_eq!(st.message, StatusCode::BadHeader.fixed_message());
    // A long identity in a trust domain west may not vouch for.
    let source = format!("spiffe://east.demo/{}", "b".repeat(2000));
    let st = send_status(&conn, &header(echo(7000), Some(&source), 1))
        .await
        .unwrap();
    assert_eq!(st.code, StatusCode::Denied);
    assert!(!st.message.contains("east"), "{st}");

    let text = String::from_utf8(logs.0.lock().unwrap().clone()).unwrap();
    let refused: Vec<&str> = text
        .lines()
        .filter(|l| l.contains("stream refused"))
        .collect();
    assert!(refused.len() >= 2, "{text}");
    assert!(refused
        .iter()
        .any(|l| l.contains("aaaa") && l.contains("bytes)")));
    assert!(refused
        .iter()
        .any(|l| l.contains("bbbb") && l.contains("bytes)")));
    for line in text.lines() {
        assert!(line.len() < 2048, "a log line of {} bytes", line.len());
        assert!(!line.contains('\u{1b}'), "a raw escape in {line}");
    }
}
