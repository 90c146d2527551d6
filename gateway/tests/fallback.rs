//! The TCP fallback between gateways: peers move to it when UDP is dropped,
//! traffic keeps flowing, QUIC is taken back when UDP returns; and the
//! fallback port answers bad input like the QUIC port does.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::Arc;
use std::time::{Duration, Instant};

use fedmesh_testkit::faults::RelayMode;
use fedmesh_testkit::{run_load, LoadSpec, Rig, RigCluster, Topology};
use fedmesh_trust::{CertificateAuthority, PeerPolicy, Svid, SvidSource, TrustDomain};
use fedmesh_wire::io::read_status;
use fedmesh_wire::{Header, ServiceName, StatusCode, Target};
use http_body_util::Empty;
use hyper::body::Bytes;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::io::AsyncWriteExt;

fn topology() -> Topology {
    let mut t = Topology::demo();
    t.fault_relays = true;
    t.tcp_fallback = true;
    t.limits.connect_timeout = Duration::from_millis(500);
    t.limits.quic_retry_interval = Duration::from_secs(1);
    t.policies = serde_yaml_ng::from_str(
        r#"
echo.demo:
  failover: [west, north]
  outlier: { consecutive_failures: 3, base_ejection: 1s }
"#,
    )
    .unwrap();
    t
}

/// How east's gateway reaches `peer` now: `quic`, `tcp` or `down`.
fn transport(east: &RigCluster, peer: &str) -> &'static str {
    east.gateway
        .peer_status()
        .into_iter()
        .find(|p| p.cluster == peer)
        .map_or("unknown", |p| p.transport)
}

/// Waits (bounded) until east reaches `peer` by `want`; how long it took.
async fn until_transport(east: &RigCluster, peer: &str, want: &str, limit: Duration) -> Duration {
    let t0 = Instant::now();
    while transport(east, peer) != want {
        assert!(
            t0.elapsed() < limit,
            "east reaches {peer} by {} after {limit:?}, not {want}: {:?}",
            transport(east, peer),
            east.gateway.peer_status()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    t0.elapsed()
}

fn spec() -> LoadSpec {
    LoadSpec {
        connections: 8,
        requests_per_connection: 5,
        request_bytes: 16 * 1024,
        ..LoadSpec::default()
    }
}

/// Load until west (preferred) serves every request again, bounded; the
/// last round must have no failure at all.
async fn west_serves_everything(east: &RigCluster) {
    let t0 = Instant::now();
    loop {
        let r = run_load(east.client_addr("echo.demo").unwrap(), &spec()).await;
        assert_eq!(r.failed, 0, "{:?}", r.errors);
        if r.served_by.keys().all(|k| k.starts_with("west/")) {
            return;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(10),
            "west never took all the traffic back: {:?}",
            r.served_by
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn udp_blocked_moves_peers_to_tcp_and_quic_is_taken_back() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter("warn,fedmesh_gateway=info")
        .with_test_writer()
        .try_init();
    let rig = Rig::start(&topology()).await.unwrap();
    let east = rig.cluster("east").unwrap();
    let west = rig.cluster("west").unwrap();
    until_transport(east, "west", "quic", Duration::from_secs(10)).await;
    west_serves_everything(east).await;

    // Every UDP packet to and from west's gateway is dropped; TCP passes.
    west.relay.as_ref().unwrap().set(RelayMode::Blackhole);
    let took = until_transport(east, "west", "tcp", Duration::from_secs(6)).await;
    println!("east moved to the TCP fallback for west {took:?} after UDP was cut");
    // While traffic may have failed over to north meanwhile, nothing failed,
    // and west (reached over TCP now) takes it all back.
    west_serves_everything(east).await;
    let m = east.gateway.metrics();
    let labels = |transport| fedmesh_gateway::TransportLabels {
        peer: "west".into(),
        transport,
    };
    assert_eq!(m.peer_transport.get_or_create(&labels("tcp")).get(), 1);
    assert_eq!(m.peer_transport.get_or_create(&labels("quic")).get(), 0);
    let fallbacks = m
        .transport_fallbacks
        .get_or_create(&fedmesh_gateway::PeerLabels {
            peer: "west".into(),
        })
        .get();
    assert!(fallbacks >= 1);
    let status = east.gateway.peer_status();
    let w = status.iter().find(|p| p.cluster == "west").unwrap();
    assert!(w.udp_blocked, "{w:?}");
    // north was never affected.
    assert_eq!(transport(east, "north"), "quic");

    // UDP returns: the background QUIC retry (every 1 s here) takes it.
    west.relay.as_ref().unwrap().set(RelayMode::Pass);
    let took = until_transport(east, "west", "quic", Duration::from_secs(5)).await;
    println!("east back on QUIC for west {took:?} after UDP returned");
    west_serves_everything(east).await;
    assert_eq!(m.peer_transport.get_or_create(&labels("quic")).get(), 1);
    // The move back did not count as a fallback.
    assert_eq!(
        m.transport_fallbacks
            .get_or_create(&fedmesh_gateway::PeerLabels {
                peer: "west".into(),
            })
            .get(),
        fallbacks
    );
}

/// An HTTP/2 client to `to`'s fallback port presenting `svid`.
async fn h2_client(
    to: &RigCluster,
    svid: &Svid,
) -> Result<hyper::client::conn::http2::SendRequest<Empty<Bytes>>, String> {
    let source = SvidSource::new(svid.clone()).unwrap();
    let tls = fedmesh_trust::client_config_from(
        &source,
        to.bundles.clone(),
        PeerPolicy::AnyTrusted,
        &[fedmesh_gateway::ALPN_H2],
    )
    .unwrap();
    let tcp = tokio::net::TcpStream::connect(to.gateway.fallback_addr().unwrap())
        .await
        .map_err(|e| e.to_string())?;
    let name = rustls::pki_types::ServerName::try_from("fedmesh.invalid").unwrap();
    let stream = tokio_rustls::TlsConnector::from(Arc::new(tls))
        .connect(name, tcp)
        .await
        .map_err(|e| e.to_string())?;
    let (send, conn) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(stream))
            .await
            .map_err(|e| e.to_string())?;
    tokio::spawn(conn);
    Ok(send)
}

async fn request(
    send: &mut hyper::client::conn::http2::SendRequest<Empty<Bytes>>,
    method: hyper::Method,
) -> Result<hyper::Response<hyper::body::Incoming>, String> {
    // CONNECT names an authority; anything else needs a path.
    let uri = match method {
        hyper::Method::CONNECT => "fedmesh.invalid:443",
        _ => "https://fedmesh.invalid/",
    };
    let req = hyper::Request::builder()
        .method(method)
        .uri(uri)
        .body(Empty::new())
        .unwrap();
    send.ready().await.map_err(|e| e.to_string())?;
    tokio::time::timeout(Duration::from_secs(5), send.send_request(req))
        .await
        .map_err(|_| "no answer".to_string())?
        .map_err(|e| e.to_string())
}

/// A CONNECT stream on `send` that sends `preface` (a tunnel header, or
/// garbage): the stream and the status the gateway answered.
async fn tunnel(
    send: &mut hyper::client::conn::http2::SendRequest<Empty<Bytes>>,
    preface: &[u8],
) -> (TokioIo<hyper::upgrade::Upgraded>, StatusCode) {
    let r = request(send, hyper::Method::CONNECT).await.unwrap();
    assert_eq!(r.status(), hyper::StatusCode::OK);
    let mut io = TokioIo::new(hyper::upgrade::on(r).await.unwrap());
    io.write_all(preface).await.unwrap();
    let status = tokio::time::timeout(Duration::from_secs(2), read_status(&mut io))
        .await
        .expect("no status frame")
        .unwrap();
    (io, status.code)
}

/// A tunnel header for `echo.demo:7000` vouching for a client of `td`.
fn vouching(td: &fedmesh_trust::TrustDomain) -> Vec<u8> {
    let mut h = Header::new(echo());
    h.source = Some(td.workload("demo", "client").unwrap().to_string());
    h.to_bytes(&fedmesh_wire::Limits::default()).unwrap()
}

fn echo() -> Target {
    Target::Service {
        name: ServiceName::new("echo", "demo").unwrap(),
        port: 7000,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_fallback_port_answers_bad_input_like_the_quic_port() {
    let mut t = Topology::demo();
    t.tcp_fallback = true;
    let rig = Rig::start(&t).await.unwrap();
    let east = rig.cluster("east").unwrap();
    let west = rig.cluster("west").unwrap();
    let m = east.gateway.metrics();
    let west_gw = west
        .ca
        .issue(
            &west.trust_domain.system_id("gateway"),
            Duration::from_secs(3600),
        )
        .unwrap();

    // A certificate from a CA nobody trusts: the handshake fails (TLS 1.3
    // shows it at the client's first use of the connection).
    let ttl = Duration::from_secs(3600);
    let stranger =
        CertificateAuthority::new_root(TrustDomain::new("west.demo").unwrap(), ttl).unwrap();
    let fake = stranger
        .issue(&west.trust_domain.system_id("gateway"), ttl)
        .unwrap();
    let refused = match h2_client(east, &fake).await {
        Err(_) => true,
        Ok(mut send) => request(&mut send, hyper::Method::CONNECT).await.is_err(),
    };
    assert!(refused, "an untrusted certificate got a stream");

    // A trusted workload (not a peer gateway) is closed after the handshake.
    let workload = west
        .ca
        .issue(
            &west.trust_domain.workload("demo", "client").unwrap(),
            Duration::from_secs(3600),
        )
        .unwrap();
    let before = m.rejected_count("unknown_peer");
    let refused = match h2_client(east, &workload).await {
        Err(_) => true,
        Ok(mut send) => request(&mut send, hyper::Method::CONNECT).await.is_err(),
    };
    assert!(refused, "a workload identity got a stream on the peer port");
    assert_eq!(m.rejected_count("unknown_peer"), before + 1);

    // A peer gateway that sends anything but CONNECT gets 405.
    let mut send = h2_client(east, &west_gw).await.unwrap();
    let r = request(&mut send, hyper::Method::GET).await.unwrap();
    assert_eq!(r.status(), hyper::StatusCode::METHOD_NOT_ALLOWED);

    // A CONNECT stream with a garbage tunnel header: a status frame, a
    // clean close, and the connection still serves the next stream.
    let (_, code) = tunnel(&mut send, b"GET / HTTP/1.1\r\n\r\n and more").await;
    assert_eq!(code, StatusCode::BadHeader);
    // A well-formed stream vouching for a west workload, for a service
    // east does not serve: a typed refusal, not a hang.
    let (_, code) = tunnel(&mut send, &vouching(&west.trust_domain)).await;
    assert_eq!(code, StatusCode::UnknownService);
    // And a peer may not vouch for another cluster's workloads.
    let (_, code) = tunnel(&mut send, &vouching(&east.trust_domain)).await;
    assert_eq!(code, StatusCode::Denied);
}

/// The fallback port caps concurrent streams per connection like the QUIC
/// port (`limits.max_streams_per_connection`, an HTTP/2 setting): a
/// further CONNECT waits until a stream ends.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_streams_per_fallback_connection_are_capped() {
    let mut t = Topology::demo();
    t.tcp_fallback = true;
    t.limits.max_streams_per_connection = 4;
    let rig = Rig::start(&t).await.unwrap();
    let east = rig.cluster("east").unwrap();
    let west = rig.cluster("west").unwrap();
    let east_gw = east
        .ca
        .issue(
            &east.trust_domain.system_id("gateway"),
            Duration::from_secs(3600),
        )
        .unwrap();
    let mut send = h2_client(west, &east_gw).await.unwrap();
    let mut open = Vec::new();
    for _ in 0..4 {
        let (io, code) = tunnel(&mut send, &vouching(&east.trust_domain)).await;
        assert_eq!(code, StatusCode::Ok);
        open.push(io);
    }
    // A fifth waits: not refused, not served.
    let req = hyper::Request::builder()
        .method(hyper::Method::CONNECT)
        .uri("fedmesh.invalid:443")
        .body(Empty::new())
        .unwrap();
    let fifth = send.send_request(req);
    tokio::pin!(fifth);
    assert!(
        tokio::time::timeout(Duration::from_millis(500), &mut fifth)
            .await
            .is_err(),
        "a fifth stream was answered beyond the cap of 4"
    );
    // One ends: the fifth goes through.
    let mut done = open.pop().unwrap();
    done.shutdown().await.unwrap();
    drop(done);
    let r = tokio::time::timeout(Duration::from_secs(5), fifth)
        .await
        .expect("the fifth stream never got a slot")
        .unwrap();
    assert_eq!(r.status(), hyper::StatusCode::OK);
}
